"""The email outbox: at most one SMTP transaction per (tenant, idempotency key).

One Redis hash per key on the broker, ``actionfleet:outbox:<tenant>:<sha256(key)>``:

- ``state``: ``sending`` (claimed, the relay may or may not have the message) or ``sent``
- ``message_id``: the deterministic Message-ID the message carries
- ``result``: the output recorded when the relay accepted the message (``sent`` only)
- ``owner``: the attempt that claimed it, ``claimed_at``: when

``claim`` is atomic (a Lua script), so two deliveries of one action running at once
cannot both send. A ``sent`` record replays its result; a ``sending`` record left by a
worker that died is reported, never re-sent: whether the relay accepted DATA before the
crash cannot be known, and a duplicate email cannot be taken back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis

__all__ = ["Claim", "Outbox"]

_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {state, redis.call('HGET', KEYS[1], 'result') or '',
          redis.call('HGET', KEYS[1], 'claimed_at') or ''}
end
redis.call('HSET', KEYS[1], 'state', 'sending', 'owner', ARGV[1], 'claimed_at', ARGV[2],
           'message_id', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'claimed', '', ARGV[2]}
"""

_COMPLETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'sent', 'result', ARGV[2], 'sent_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'sending' then return 0 end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["claimed", "sending", "sent"]
    key: str
    owner: str
    result: dict[str, Any] | None = None
    claimed_at: float | None = None


class Outbox:
    def __init__(
        self, url: str, ttl_s: int = 30 * 86_400, prefix: str = "actionfleet:outbox"
    ) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._claim = self.redis.register_script(_CLAIM)
        self._complete = self.redis.register_script(_COMPLETE)
        self._release = self.redis.register_script(_RELEASE)

    def key(self, tenant_id: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
        return f"{self.prefix}:{tenant_id}:{digest}"

    def claim(self, tenant_id: str, idempotency_key: str, message_id: str) -> Claim:
        key = self.key(tenant_id, idempotency_key)
        owner = uuid.uuid4().hex
        state, result, claimed_at = self._claim(
            keys=[key], args=[owner, repr(time.time()), message_id, self.ttl_s]
        )
        state = state.decode()
        return Claim(
            state=state,
            key=key,
            owner=owner,
            result=json.loads(result) if result else None,
            claimed_at=float(claimed_at) if claimed_at else None,
        )

    def complete(self, claim: Claim, result: dict[str, Any]) -> bool:
        """Record the relay's acceptance. Retried a few times: this write is what closes
        the window in which a crash leaves the outcome unknown."""
        payload = json.dumps(result, separators=(",", ":"), default=str)
        for delay in (0.0, 0.05, 0.2, 0.5, 1.0):
            time.sleep(delay)
            try:
                return bool(
                    self._complete(
                        keys=[claim.key], args=[claim.owner, payload, repr(time.time()), self.ttl_s]
                    )
                )
            except redis.RedisError:
                continue
        return False

    def release(self, claim: Claim) -> None:
        """Forget a claim whose message certainly did not reach the relay (so a retry may
        send it)."""
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[claim.key], args=[claim.owner])

    def close(self) -> None:
        self.redis.close()
