"""Exactly-once effects on at-least-once delivery: one record per idempotency key.

The broker delivers an action at least once (late acks: a worker that dies mid-action
gets it redelivered; a visibility timeout can deliver it twice). The record, one Redis
key per (tenant, idempotency key), makes the *execution* happen once:

- absent        -> the delivery claims it: ``in progress`` with an owner and a lease
                   (``lease_s``, renewed while the action runs by ``workers.leasekeeper``)
- in progress   -> held by another live delivery: this one is deferred (re-queued with a
                   countdown), never run in parallel. A holder that died stops renewing;
                   its lease expires and the next delivery takes over.
- completed     -> the stored result is returned; nothing runs again.

Limits (see docs/reliability.md): a holder that dies *after* its effect happened but
*before* the result was recorded will have the action run again by the next delivery.
Closing that window needs the effect itself to be idempotent (e.g. passing the key to
the upstream API); ``ctx.extra["idempotency_key"]`` gives executors the key for that.
Keys are scoped per tenant, so two tenants cannot collide or read each other's results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import redis

from workers.limits import PREFIX

__all__ = ["Claim", "IdempotencyStore"]

# KEYS[1]: record. ARGV: owner, lease_ms. Returns {state, payload}.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], cjson.encode({s = 'p', o = ARGV[1]}), 'PX', ARGV[2])
  return {'claimed', ''}
end
local r = cjson.decode(v)
if r.s == 'c' then return {'completed', r.r} end
if r.o == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'claimed', ''}
end
return {'busy', tostring(redis.call('PTTL', KEYS[1]))}
"""

# Record the result only while we still hold the lease (or nobody does): if our lease
# expired and another delivery took over, that delivery's result is the one to keep.
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v then
  local r = cjson.decode(v)
  if r.s == 'c' or r.o ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], cjson.encode({s = 'c', o = ARGV[1], r = ARGV[2]}), 'EX', ARGV[3])
return 1
"""

_OWNED = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local r = cjson.decode(v)
if r.s ~= 'p' or r.o ~= ARGV[1] then return 0 end
if ARGV[2] == 'release' then redis.call('DEL', KEYS[1]) else
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["claimed", "completed", "busy"]
    result: dict[str, Any] | None = None
    wait_s: float = 0.0


class IdempotencyStore:
    def __init__(self, client: redis.Redis, *, lease_s: float, retention_s: int) -> None:
        self.client = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self.retention_s = retention_s
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._owned = client.register_script(_OWNED)

    @staticmethod
    def key(tenant: str, idempotency_key: str) -> str:
        return f"{PREFIX}:idem:{tenant}:{idempotency_key}"

    def claim(self, key: str, owner: str) -> Claim:
        state, payload = self._claim(keys=[key], args=[owner, self.lease_ms])
        state = state.decode() if isinstance(state, bytes) else state
        if state == "completed":
            return Claim("completed", result=json.loads(payload))
        if state == "busy":
            return Claim("busy", wait_s=max(0.001, int(payload) / 1000))
        return Claim("claimed")

    def complete(self, key: str, owner: str, result: dict[str, Any]) -> bool:
        return bool(self._complete(keys=[key], args=[owner, json.dumps(result), self.retention_s]))

    def renew(self, key: str, owner: str) -> bool:
        return bool(self._owned(keys=[key], args=[owner, self.lease_ms]))

    def release(self, key: str, owner: str) -> bool:
        return bool(self._owned(keys=[key], args=[owner, "release"]))

    def forget(self, key: str) -> None:
        """Drop the record whatever its state (dead-letter replay runs the action again)."""
        self.client.delete(key)
