"""Dead letters: actions whose retries ran out, kept with every attempt for an operator.

Each entry is one Redis key ``af:dead:<action_id>`` (JSON: the full message, every
attempt's error and timestamps, the final result) plus a sorted-set index by time.
``actionfleet dead list|show|replay|purge`` works on them; ``replay`` sends the same
message again under the same action id (so the agent's handle sees the new result) after
forgetting its idempotency record, and removes the entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

import redis

from workers.limits import PREFIX

__all__ = ["DeadLetterStore", "add_dead_parser"]

INDEX = f"{PREFIX}:dead:index"


def _entry_key(action_id: str) -> str:
    return f"{PREFIX}:dead:{action_id}"


class DeadLetterStore:
    def __init__(self, client: redis.Redis, retention_s: int = 30 * 86_400) -> None:
        self.client = client
        self.retention_s = retention_s

    def put(
        self,
        message: dict[str, Any],
        attempts: list[dict[str, Any]],
        result: dict[str, Any],
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        entry = {
            "action_id": result["action_id"],
            "primitive": result["primitive"],
            "tenant_id": message.get("tenant_id"),
            "agent_id": message.get("agent_id"),
            "dead_at": now.isoformat(),
            "error": result.get("error"),
            "attempts": attempts,
            "message": message,
            "result": result,
        }
        with self.client.pipeline() as pipe:
            pipe.set(_entry_key(entry["action_id"]), json.dumps(entry), ex=self.retention_s)
            pipe.zadd(INDEX, {entry["action_id"]: now.timestamp()})
            pipe.execute()
        return entry

    def get(self, action_id: str) -> dict[str, Any] | None:
        raw = self.client.get(_entry_key(action_id))
        return json.loads(raw) if raw else None

    def list(self, limit: int = 100, tenant: str | None = None) -> list[dict[str, Any]]:
        """Newest first; entries past their retention drop out of the index here."""
        out: list[dict[str, Any]] = []
        for raw_id in self.client.zrevrange(INDEX, 0, -1):
            action_id = raw_id.decode()
            entry = self.get(action_id)
            if entry is None:
                self.client.zrem(INDEX, action_id)
                continue
            if tenant is None or entry.get("tenant_id") == tenant:
                out.append(entry)
            if len(out) >= limit:
                break
        return out

    def remove(self, action_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.delete(_entry_key(action_id))
            pipe.zrem(INDEX, action_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def purge(self, before: datetime | None = None) -> int:
        cutoff = before.timestamp() if before else "+inf"
        ids = [i.decode() for i in self.client.zrangebyscore(INDEX, "-inf", cutoff)]
        return sum(self.remove(i) for i in ids)


# --------------------------------------------------------------------------- CLI


def _store() -> tuple[DeadLetterStore, str]:
    from producer.config import get_settings
    from producer.errors import FleetUnavailable

    settings = get_settings()
    url = settings.limits_redis_url or settings.resolved_broker_url()
    if not url:
        raise FleetUnavailable(
            "no broker configured: set ACTIONFLEET_BROKER_URL or start a fleet with "
            "`actionfleet up`"
        )
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    return DeadLetterStore(client, settings.dead_letter_retention_days * 86_400), url


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    error = entry.get("error") or {}
    return {
        "action_id": entry["action_id"],
        "primitive": entry["primitive"],
        "tenant_id": entry.get("tenant_id"),
        "dead_at": entry["dead_at"],
        "attempts": len(entry.get("attempts", [])),
        "error_type": error.get("type"),
        "error": (error.get("message") or "")[:200],
    }


def _cmd_dead(args: argparse.Namespace) -> int:
    store, url = _store()
    if args.dead_cmd == "list":
        entries = store.list(limit=args.limit, tenant=args.tenant)
        print(json.dumps([_summary(e) for e in entries], indent=2))
        return 0
    if args.dead_cmd == "purge":
        if not args.all and not args.id and args.before is None:
            print("error: say what to purge: --all, --before TIME, or ids", file=sys.stderr)
            return 2
        if args.id:
            count = sum(store.remove(i) for i in args.id)
        else:
            count = store.purge(datetime.fromisoformat(args.before) if args.before else None)
        print(json.dumps({"purged": count}))
        return 0
    entry = store.get(args.id)
    if entry is None:
        print(f"error: no dead letter with action id {args.id!r}", file=sys.stderr)
        return 1
    if args.dead_cmd == "show":
        print(json.dumps(entry, indent=2))
        return 0
    return _replay(store, url, entry)


def _replay(store: DeadLetterStore, url: str, entry: dict[str, Any]) -> int:
    from producer.client import ActionClient
    from producer.config import Settings
    from producer.models import PRIMITIVES
    from workers.idempotency import IdempotencyStore

    message = entry["message"]
    key = message.get("idempotency_key") or message.get("action_id")
    # The stored final failure would otherwise be returned instead of running again.
    store.client.delete(IdempotencyStore.key(message["tenant_id"], key))
    with ActionClient(url, settings=Settings(broker_url=url), primitives=PRIMITIVES) as client:
        # Drop the stored final failure so that whoever waits on this id gets the new one.
        client._app.AsyncResult(entry["action_id"]).forget()
        handle = client.submit(message)
    store.remove(entry["action_id"])
    print(json.dumps({"replayed": handle.action_id, "primitive": handle.primitive}))
    return 0


def add_dead_parser(subparsers: Any) -> None:
    """Register ``actionfleet dead ...`` on the main CLI's subparsers."""
    p = subparsers.add_parser("dead", help="dead-lettered actions: list, show, replay, purge")
    sub = p.add_subparsers(dest="dead_cmd", required=True, metavar="SUBCOMMAND")
    lst = sub.add_parser("list", help="newest first, one summary per action")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--tenant", default=None)
    show = sub.add_parser("show", help="the full entry: message, every attempt, result")
    show.add_argument("id", help="action id")
    replay = sub.add_parser("replay", help="send the action again (same action id)")
    replay.add_argument("id", help="action id")
    purge = sub.add_parser("purge", help="delete entries")
    purge.add_argument("id", nargs="*", help="action ids (default: see --all / --before)")
    purge.add_argument("--all", action="store_true", help="every entry")
    purge.add_argument("--before", default=None, help="entries dead before this ISO time")
    p.set_defaults(func=_cmd_dead)
