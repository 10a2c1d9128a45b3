"""Actions parked in Redis until a human decides, and the decisions.

Keys (Redis, the limits Redis: the broker unless configured)::

    af:approval:<id>        hash: the record -- status, the message exactly as it came,
                            the rule that asked, who decided and why
    af:approvals:pending    zset id -> expiry (ms): what waits, and when it times out
    af:approvals:all        zset id -> created (ms): for listing
    af:approvals:dispatch   zset id -> when to send the decided message (again)

``<id>`` is the action's task id, ``<tenant>+<action_id>``. A record goes ``pending`` ->
``approved`` | ``denied`` | ``expired`` once, in a Lua script (``DECIDE``): of two approvers
at once, one decides and the other is told who did. The decider then sends the parked
message back to its queue; a worker finds the decision (``take``) and runs it, or ends
it ``denied`` / ``expired``. A decided message no worker took within ``redispatch_s`` is
sent again by the sweep (the decider may have died between the two steps); a duplicate
is harmless, the action's idempotency record answers it.

Nothing here expires while pending: a record survives worker and Redis restarts (with
Redis persistence on). Once a worker took the decision the record is kept
``retention_s`` for ``approvals show`` and then dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import redis

from producer.models import queue_for, task_name_for
from producer.transport import kwargs_repr, redis_priority, task_id_for

__all__ = [
    "ApprovalRecord",
    "ApprovalStore",
    "Decided",
    "decide_and_send",
    "message_digest",
    "send_message",
]

PREFIX = "af:approval:"
PENDING = "af:approvals:pending"
ALL = "af:approvals:all"
DISPATCH = "af:approvals:dispatch"
Status = Literal["pending", "approved", "denied", "expired"]

# KEYS: record, pending, all, nonce ('' when none). ARGV: now_ms, expires_ms, id,
# nonce? (1/0), action id, fresh (1/0), nonce ttl s, then the record's field/value pairs.
# The replay check of workers.auth.verify.NonceCheck, made here because a parked action
# never reaches the admission script; its record is kept as long as the approval may last.
_PARK = """
local st = redis.call('HGET', KEYS[1], 'status')
if st then return st end
if ARGV[4] == '1' then
  local seen = redis.call('GET', KEYS[4])
  if seen and seen ~= ARGV[5] then return 'replay' end
  if (not seen) and ARGV[6] ~= '1' then return 'stale' end
  redis.call('SET', KEYS[4], ARGV[5], 'EX', tonumber(ARGV[7]))
end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'status', 'pending', unpack(fields))
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), ARGV[3])
redis.call('ZADD', KEYS[3], tonumber(ARGV[1]), ARGV[3])
return 'parked'
"""

# KEYS: record, pending, dispatch. ARGV: now_ms, status, by, reason, id, redispatch_ms.
# Past its expiry a pending record becomes expired whatever was asked.
_DECIDE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', ''} end
if st ~= 'pending' then return {st, redis.call('HGET', KEYS[1], 'decided_by') or ''} end
local now = tonumber(ARGV[1])
local status, by, reason = ARGV[2], ARGV[3], ARGV[4]
if now >= tonumber(redis.call('HGET', KEYS[1], 'expires_ms')) then
  status, by, reason = 'expired', 'timeout', 'nobody decided within the approval timeout'
end
redis.call('HSET', KEYS[1], 'status', status, 'decided_by', by, 'reason', reason,
           'decided_ms', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
return {'decided', status}
"""

# KEYS: record, dispatch. ARGV: now_ms, id, retention_s.
_TAKE = """
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HSETNX', KEYS[1], 'taken_ms', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _iso(ms: str | int | None) -> str | None:
    return None if ms in (None, "") else datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat()


def message_digest(raw: dict[str, Any]) -> str:
    """The parked message's fingerprint: a decision applies to exactly that message."""
    return hashlib.sha256(
        json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    id: str
    status: Status
    tenant_id: str
    agent_id: str
    primitive: str
    action: str  # the Cedar action, e.g. email:send
    rule_id: str
    description: str
    rules: list[str]
    created_at: str | None
    expires_at: str | None
    message: dict[str, Any] = field(repr=False)
    digest: str = ""
    decided_by: str = ""
    reason: str = ""
    decided_at: str | None = None
    taken_at: str | None = None

    @classmethod
    def from_hash(cls, approval_id: str, h: dict[bytes, bytes]) -> ApprovalRecord:
        d = {k.decode(): v.decode() for k, v in h.items()}
        return cls(
            id=approval_id,
            status=d["status"],  # type: ignore[arg-type]
            tenant_id=d.get("tenant_id", ""),
            agent_id=d.get("agent_id", ""),
            primitive=d.get("primitive", ""),
            action=d.get("action", ""),
            rule_id=d.get("rule_id", ""),
            description=d.get("description", ""),
            rules=json.loads(d.get("rules", "[]")),
            created_at=_iso(d.get("created_ms")),
            expires_at=_iso(d.get("expires_ms")),
            message=json.loads(d.get("message", "{}")),
            digest=d.get("digest", ""),
            decided_by=d.get("decided_by", ""),
            reason=d.get("reason", ""),
            decided_at=_iso(d.get("decided_ms")),
            taken_at=_iso(d.get("taken_ms")),
        )

    def public(self, with_payload: bool = False) -> dict[str, Any]:
        """What ``approvals list|show`` and the HTTP endpoint show (never the signature)."""
        out = {
            "id": self.id,
            "status": self.status,
            "tenant_id": self.tenant_id,
            "agent_id": self.agent_id,
            "action": self.action,
            "rule_id": self.rule_id,
            "description": self.description,
            "rules": self.rules,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "decided_by": self.decided_by or None,
            "reason": self.reason or None,
            "decided_at": self.decided_at,
            "taken_at": self.taken_at,
        }
        if with_payload:
            m = self.message
            out["message"] = {k: v for k, v in m.items() if k != "auth"}
        return out


@dataclass(frozen=True, slots=True)
class Decided:
    """The answer of ``ApprovalStore.decide``: ``decided`` is False when someone (or the
    timeout) decided first; ``status`` and ``by`` say what stands."""

    decided: bool
    status: str
    by: str
    record: ApprovalRecord | None


def send_message(app: Any, message: dict[str, Any]) -> None:
    """Publish an action message to its queue under its own task id (a Celery app's
    ``send_task``; the worker's own app, or a client app of the operator's commands)."""
    primitive = str(message["primitive"])
    tenant, action_id = str(message["tenant_id"]), str(message["action_id"])
    app.send_task(
        task_name_for(primitive),
        kwargs={"message": message},
        queue=queue_for(primitive),
        declare=[],
        task_id=task_id_for(tenant, action_id),
        priority=redis_priority(int(message.get("priority") or 0)),
        argsrepr="()",
        kwargsrepr=kwargs_repr(primitive, action_id, tenant),
    )


class ApprovalStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_s: int = 7 * 86_400,
        redispatch_s: float = 60.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.client = client
        self.retention_s = retention_s
        self.redispatch_ms = int(redispatch_s * 1000)
        self.now = now
        self._park = client.register_script(_PARK)
        self._decide = client.register_script(_DECIDE)
        self._take = client.register_script(_TAKE)

    @staticmethod
    def key(approval_id: str) -> str:
        return PREFIX + approval_id

    def park(
        self,
        raw: dict[str, Any],
        fields: dict[str, str | int],
        expires: datetime,
        nonce: Any = None,
        nonce_ttl_s: int = 0,
    ) -> str:
        """Park ``raw`` unless a record exists: ``parked``, the existing record's status,
        or ``replay`` / ``stale`` (the replay check refused it; nothing was written)."""
        tenant, action_id = str(raw["tenant_id"]), str(raw["action_id"])
        approval_id = task_id_for(tenant, action_id)
        now = self.now()
        pairs: list[str | int] = []
        record = {
            **fields,
            "message": json.dumps(raw, separators=(",", ":")),
            "digest": message_digest(raw),
            "created_ms": _ms(now),
            "expires_ms": _ms(expires),
        }
        for k, v in record.items():
            pairs += [k, v]
        keys = [self.key(approval_id), PENDING, ALL, nonce.key if nonce is not None else ""]
        args = [
            _ms(now),
            _ms(expires),
            approval_id,
            1 if nonce is not None else 0,
            nonce.action_id if nonce is not None else "",
            1 if nonce is not None and nonce.fresh else 0,
            max(nonce_ttl_s, nonce.ttl_s if nonce is not None else 0),
            *pairs,
        ]
        out = self._park(keys=keys, args=args)
        return out.decode() if isinstance(out, bytes) else str(out)

    def get(self, approval_id: str) -> ApprovalRecord | None:
        h = self.client.hgetall(self.key(approval_id))
        return ApprovalRecord.from_hash(approval_id, h) if h else None

    def list(self, status: str | None = "pending", limit: int = 200) -> list[ApprovalRecord]:
        """Newest first; ``status`` None: all kept records."""
        ids = [i.decode() for i in self.client.zrevrange(ALL, 0, max(0, limit * 4) - 1)]
        with self.client.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(self.key(i))
            rows = pipe.execute()
        out, gone = [], []
        for i, h in zip(ids, rows, strict=True):
            if not h:
                gone.append(i)  # its record expired after a worker took it
                continue
            rec = ApprovalRecord.from_hash(i, h)
            if status is None or rec.status == status:
                out.append(rec)
        if gone:
            self.client.zrem(ALL, *gone)
        return out[:limit]

    def decide(self, approval_id: str, status: Status, by: str, reason: str) -> Decided:
        """Approve or deny (or expire) a pending record, once; see ``Decided``."""
        keys = [self.key(approval_id), PENDING, DISPATCH]
        args = [_ms(self.now()), status, by, reason, approval_id, self.redispatch_ms]
        what, value = (x.decode() for x in self._decide(keys=keys, args=args))
        record = self.get(approval_id)
        if what == "decided":
            return Decided(True, value, record.decided_by if record else by, record)
        if what == "missing":
            return Decided(False, "missing", "", None)
        return Decided(False, what, value, record)

    def take(self, approval_id: str) -> None:
        """A worker found the decision: stop re-sending it; keep the record a while."""
        keys = [self.key(approval_id), DISPATCH]
        self._take(keys=keys, args=[_ms(self.now()), approval_id, self.retention_s])

    def sweep(self, limit: int = 100) -> list[dict[str, Any]]:
        """Expire what timed out and return the messages of decided records that no
        worker took yet (to send to their queues)."""
        now = _ms(self.now())
        for raw_id in self.client.zrangebyscore(PENDING, "-inf", now, start=0, num=limit):
            self.decide(raw_id.decode(), "expired", "timeout", "timeout")
        due = self.client.zrangebyscore(DISPATCH, "-inf", now, start=0, num=limit)
        out = []
        for raw_id in due:
            approval_id = raw_id.decode()
            # Bump first (XX: only while still waiting to be taken); a second sweeper
            # at the same time sends a duplicate at worst, which idempotency answers.
            self.client.zadd(DISPATCH, {approval_id: now + self.redispatch_ms}, xx=True)
            rec = self.get(approval_id)
            if rec is None:
                self.client.zrem(DISPATCH, approval_id)
                continue
            out.append(rec.message)
        return out


def decide_and_send(
    store: ApprovalStore,
    send: Callable[[dict[str, Any]], None],
    approval_id: str,
    status: Status,
    by: str,
    reason: str,
) -> Decided:
    """Decide, then send the decided message to its queue (only the one who decided
    sends; the sweep sends it again if this process dies in between)."""
    decided = store.decide(approval_id, status, by, reason)
    if decided.decided and decided.record is not None:
        send(decided.record.message)
    return decided
