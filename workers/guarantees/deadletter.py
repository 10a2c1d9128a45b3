"""Dead letters: actions whose retries ran out, kept with every attempt for an operator.

Each entry is one Redis key ``af:dead:<action_id>`` (JSON: the full message, every
attempt's error and timestamps, the final result) plus a sorted-set index by time.
``actionfleet dead list|show|replay|purge`` (workers/ops/dead.py) works on them: ``replay``
sends the same message again under the same action id (so the agent's handle sees the new
result) after forgetting its idempotency record, and removes the entry.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis

from workers.guarantees.limits import PREFIX

__all__ = ["DeadLetterStore"]

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
