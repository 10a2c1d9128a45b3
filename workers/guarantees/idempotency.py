"""Exactly-once effects on at-least-once delivery: one record per idempotency key.

The broker delivers an action at least once (late acks: a worker that dies mid-action
gets it redelivered; a visibility timeout can deliver it twice). The record, one Redis
key per (tenant, idempotency key), makes the *execution* happen once:

- absent        -> the delivery claims it: ``in progress`` with an owner and a lease
                   (``lease_s``, renewed while the action runs by ``guarantees.leasekeeper``)
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

from workers.guarantees.admission import Scripts, Verdict
from workers.guarantees.limits import PREFIX

__all__ = ["Claim", "IdempotencyStore", "claim_of"]

# The record is JSON: {"s": "p" (in progress) | "c" (completed), "o": owner, "r": result
# JSON (completed only)}. The scripts that read and write it are in workers.guarantees.admission.


@dataclass(frozen=True, slots=True)
class Claim:
    state: Literal["claimed", "completed", "busy"]
    result: dict[str, Any] | None = None
    wait_s: float = 0.0


class IdempotencyStore:
    """The record on its own (the pipeline's guard claims and settles it together with the
    limits, in one round trip each: ``workers.reliability``)."""

    def __init__(self, client: redis.Redis, *, lease_s: float, retention_s: int) -> None:
        self.client = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self.retention_s = retention_s
        self._scripts = Scripts(client)

    @staticmethod
    def key(tenant: str, idempotency_key: str) -> str:
        return f"{PREFIX}:idem:{tenant}:{idempotency_key}"

    def claim(self, key: str, owner: str) -> Claim:
        return claim_of(self._scripts.admit(claim=(key, owner, self.lease_ms)))

    def complete(self, key: str, owner: str, result: dict[str, Any]) -> bool:
        """Store ``result`` -- only while ``owner`` holds the claim, or nobody does: if its
        lease lapsed and another delivery took over, that one's result is kept."""
        payload = json.dumps(result)
        return self._scripts.settle(claim=("c", key, owner, payload, self.retention_s))[0]

    def renew(self, key: str, owner: str) -> bool:
        return self._scripts.settle(claim=("n", key, owner, self.lease_ms, 0))[0]

    def release(self, key: str, owner: str) -> bool:
        return self._scripts.settle(claim=("r", key, owner, "", 0))[0]

    def forget(self, key: str) -> None:
        """Drop the record whatever its state (dead-letter replay runs the action again)."""
        self.client.delete(key)


def claim_of(verdict: Verdict) -> Claim:
    """The idempotency part of an ADMIT verdict (``ok``, or a refusal by a later section,
    means the claim itself was free)."""
    if verdict.outcome == "done":
        return Claim("completed", result=json.loads(verdict.result))
    if verdict.outcome == "busy":
        return Claim("busy", wait_s=max(0.001, verdict.value / 1000))
    return Claim("claimed")
