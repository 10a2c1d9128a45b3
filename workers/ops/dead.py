"""``actionfleet dead``: list, show, replay and purge dead-lettered actions."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

import redis

from workers.guarantees.deadletter import DeadLetterStore

__all__ = ["add_dead_parser"]


def _store() -> tuple[DeadLetterStore, str]:
    from producer.errors import FleetUnavailable
    from workers.config import get_settings

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
    from producer.models import PRIMITIVES
    from producer.transport import task_id_for
    from workers.config import Settings
    from workers.guarantees.idempotency import IdempotencyStore

    message = entry["message"]
    key = message.get("idempotency_key") or message.get("action_id")
    # The stored final failure would otherwise be returned instead of running again.
    store.client.delete(IdempotencyStore.key(message["tenant_id"], key))
    with ActionClient(url, settings=Settings(broker_url=url), primitives=PRIMITIVES) as client:
        # Drop the stored final failure so that whoever waits on this id gets the new one.
        task_id = task_id_for(message["tenant_id"], entry["action_id"])
        client._app.AsyncResult(task_id).forget()
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
