"""The pipeline's reliability guard: limits, quotas, idempotency, retries, dead letters.

The pipeline calls it at two points (see ``workers.pipeline``):

``admit`` (after policy, right before the executor), in one round trip -- the ADMIT
script of ``workers.guarantees.admission``, which writes nothing unless every step passes (but the
slot a rate deferral books) -- in this order:
  1. idempotency claim  -- a completed duplicate returns its stored result (``Duplicate``);
                           a duplicate still running elsewhere defers this delivery.
  2. rate limits        -- tenant x primitive, agent, destination host (GCRA, booked slot)
  3. concurrency lease  -- tenant x primitive
  4. monthly quota      -- counted here, once per action: only actions that get this far
                           run, so denied, invalid, expired and deferred ones never count.
  Over a limit the action is deferred (``Deferred``: the task re-queues the same message,
  same task id, with a countdown) or, when the agent asked ``on_limit: "fail"``, it ends
  ``rate_limited`` with ``retry_after_s``. A deferral that would start past the deadline
  ends ``expired`` instead.

``settle`` (once the result is known; one round trip, the SETTLE script, records the
result or frees the claim and frees the lease): either schedules a
retry (retryable error in ``retries.retry_on``, attempts left, deadline allows) or makes
the result final: stored in the idempotency record when the executor ran, and
dead-lettered when it is a retryable failure whose retries ran out.

State that must survive a re-queue (earlier attempts, whether the quota was counted,
whether a rate slot is booked) travels in the task's ``retry_state`` keyword argument.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis

from producer.errors import DeadlinePassed, QuotaExceeded, RateLimited
from producer.models import Action, ActionResult
from workers.config import Settings
from workers.guarantees.admission import SETTLE, ClaimOp, Scripts, settle_args
from workers.guarantees.deadletter import DeadLetterStore
from workers.guarantees.idempotency import IdempotencyStore
from workers.guarantees.leasekeeper import LeaseKeeper
from workers.guarantees.limits import (
    ConcurrencyLimiter,
    Lease,
    QuotaCounter,
    QuotaVerdict,
    RateLimiter,
    gcra_buckets,
    rate_keys,
)
from workers.guarantees.retries import backoff_s
from workers.middleware import ActionContext, Reschedule
from workers.policy import Grant

log = logging.getLogger(__name__)

__all__ = ["Deferred", "Duplicate", "Reliability", "Reschedule", "RetryState", "guarantees_client"]

_json = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per action


def _to_json(value: Any) -> bytes | str:
    """The result as stored in the idempotency record: orjson (~10x cheaper); json for
    what orjson refuses (ints past 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return _json(value)


# Waiting for a concurrency slot or a running duplicate: poll at this pace (with jitter)
# rather than until the holder's lease expiry, since holders usually finish far earlier.
POLL_S = 0.5


@dataclass(slots=True)
class RetryState:
    attempts: list[dict[str, Any]] = field(default_factory=list)  # failed attempts so far
    deferrals: int = 0
    quota_counted: bool = False
    rate_booked: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RetryState:
        data = data or {}
        return cls(
            attempts=list(data.get("attempts", [])),
            deferrals=int(data.get("deferrals", 0)),
            quota_counted=bool(data.get("quota_counted", False)),
            rate_booked=bool(data.get("rate_booked", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "deferrals": self.deferrals,
            "quota_counted": self.quota_counted,
            "rate_booked": self.rate_booked,
        }


class Deferred(Exception):  # a control signal, not an error
    """Over a limit (or a duplicate is running): not now, later. Never reaches the agent."""

    def __init__(self, wait_s: float, reason: str) -> None:
        super().__init__(reason)
        self.wait_s = wait_s
        self.reason = reason


class Duplicate(Exception):  # a control signal, not an error
    """This idempotency key already completed: ``result`` is what the agent gets."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("duplicate delivery of a completed action")
        self.result = result


@dataclass(slots=True)
class _Held:
    """What an admitted delivery holds until ``release``: its claim and maybe a lease."""

    idem_key: str
    owner: str
    lease: Lease | None = None
    handle: int = 0  # the lease keeper's


def state_of(ctx: ActionContext) -> RetryState:
    state = ctx.extra.get("retry_state")
    if not isinstance(state, RetryState):
        state = RetryState.from_dict(state if isinstance(state, dict) else None)
        ctx.extra["retry_state"] = state
    return state


def guarantees_client(settings: Settings, broker_url: str) -> redis.Redis:
    """The Redis of the fleet's guarantees (limits, idempotency, leases, workflow state):
    ``limits_redis_url``, else the broker's; short timeouts, so a lost Redis fails fast."""
    return redis.Redis.from_url(
        settings.limits_redis_url or broker_url,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry_on_timeout=True,
    )


class Reliability:
    def __init__(
        self,
        client: redis.Redis,
        *,
        lease_s: float = 10.0,
        idempotency_retention_s: int = 86_400,
        dead_retention_s: int = 30 * 86_400,
        max_defer_s: float = 300.0,
    ) -> None:
        self.client = client
        self.rate = RateLimiter(client)
        self.concurrency = ConcurrencyLimiter(client, lease_s)
        self.quota = QuotaCounter(client)
        self.idempotency = IdempotencyStore(
            client, lease_s=lease_s, retention_s=idempotency_retention_s
        )
        self.dead = DeadLetterStore(client, dead_retention_s)
        self.scripts = Scripts(client)  # the pipeline's path: ADMIT and SETTLE directly
        self.keeper = LeaseKeeper(lease_s / 3)
        self.max_defer_s = max_defer_s
        # True when the Celery task stores results on this same Redis with
        # workers.celery.backend.FleetRedisBackend: the settle write then rides in the result's
        # own transaction instead of costing a round trip (set by workers.app).
        self.defer_settle = False

    @classmethod
    def from_settings(cls, settings: Settings, broker_url: str) -> Reliability:
        client = guarantees_client(settings, broker_url)
        return cls(
            client,
            lease_s=settings.lease_s,
            idempotency_retention_s=settings.idempotency_retention_s,
            dead_retention_s=settings.dead_letter_retention_days * 86_400,
            max_defer_s=settings.max_defer_s,
        )

    # -- before the executor -------------------------------------------------------------

    def admit(self, ctx: ActionContext, action: Action, grant: Grant) -> None:
        """Hold everything the action needs, or raise ``Duplicate``, ``Deferred`` or an
        ``ActionError`` (rate_limited, quota_exceeded, expired).

        One round trip: the ADMIT script (workers/guarantees/admission.py) checks every section and
        writes only when all pass, so a refused action holds nothing afterwards."""
        state = state_of(ctx)
        limits = grant.tenant.limits
        fail_fast = action.on_limit == "fail"
        owner = f"{ctx.worker}:{os.getpid()}:{ctx.trace_id}"
        idem_key = IdempotencyStore.key(action.tenant_id, action.idempotency_key or "")
        if state.rate_booked:
            state.rate_booked = False  # this delivery runs in the slot booked for it
            buckets: list[tuple[str, int, int]] = []
        else:
            buckets = gcra_buckets(rate_keys(action, limits))
        lease: Lease | None = None
        if (limit := limits.concurrency.get(action.primitive)) is not None:
            lease = Lease(ConcurrencyLimiter.key(action.tenant_id, action.primitive), owner)
        counters = None
        if not state.quota_counted:
            counters = QuotaCounter.counters(action, limits.quota)
        ttl_ms = self.idempotency.lease_ms
        nonce = ctx.extra.pop("_nonce", None)  # workers.auth.verify.NonceCheck
        verdict = self.scripts.admit(
            nonce=None if nonce is None else (nonce.key, nonce.action_id, nonce.fresh, nonce.ttl_s),
            claim=(idem_key, owner, ttl_ms),
            rate=(buckets, not fail_fast),
            lease=None if lease is None else (lease.key, owner, limit or 0, ttl_ms),
            quota=None
            if counters is None
            else ([(k, n) for _, k, n in counters.scoped], counters.expire_at),
        )
        outcome = verdict.outcome
        if outcome in ("replay", "stale"):
            assert nonce is not None
            raise nonce.refusal(outcome)
        if outcome == "done":
            raise Duplicate(json.loads(verdict.result))
        if outcome == "busy":
            wait = max(0.001, verdict.value / 1000)
            raise self._defer(action, min(wait, POLL_S), "a duplicate is running")
        ctx.extra["idempotency_key"] = action.idempotency_key
        ctx.extra["_retries"] = grant.tenant.retries
        if outcome == "rate":
            wait = verdict.value / 1_000_000
            if fail_fast:
                raise _limited(f"tenant {action.tenant_id!r} is over its rate limit", wait)
            state.rate_booked = True  # the script booked the slot at ``wait``
            raise self._defer(action, wait, "rate limit")
        if outcome == "conc":
            wait = min(verdict.value / 1000, POLL_S)
            if fail_fast:
                raise _limited(
                    f"tenant {action.tenant_id!r} already runs {limit} {action.primitive} "
                    "actions at once (its concurrency limit)",
                    wait,
                    limit="concurrency",
                )
            raise self._defer(action, wait, "concurrency limit")
        if outcome == "quota":
            assert counters is not None
            raise _over_quota(action, counters.verdict(verdict.value, verdict.used))
        state.quota_counted = True
        held = _Held(idem_key, owner, lease)
        held.handle = self.keeper.hold(lambda: self._renew(held))
        ctx.extra["_held"] = held

    def _defer(self, action: Action, wait_s: float, reason: str) -> Exception:
        if reason != "rate limit":  # booked slots are exact; polls spread out
            wait_s = wait_s * random.uniform(1.0, 1.5)
        if action.deadline is not None:
            starts = datetime.now(UTC) + timedelta(seconds=wait_s)
            if starts > action.deadline:
                return DeadlinePassed(
                    f"held back by its {reason}, the action could start only after its "
                    f"deadline {action.deadline.isoformat()}; send it again with a later "
                    "deadline or at a slower pace",
                    deadline=action.deadline.isoformat(),
                    wait_s=round(wait_s, 3),
                )
        return Deferred(min(wait_s, self.max_defer_s), reason)

    # -- after the executor --------------------------------------------------------------

    def release(self, ctx: ActionContext, *, completed: dict[str, Any] | None = None) -> None:
        """Record ``completed`` as the key's result (or free the claim) and free the lease,
        in one round trip (the SETTLE script)."""
        held = ctx.extra.pop("_held", None)
        if not isinstance(held, _Held):
            return
        self.keeper.drop(held.handle)
        op: ClaimOp = "r"  # free the claim: the next delivery runs the action
        payload: bytes | str = ""
        retention_s = 0
        if completed is not None:
            op, retention_s = "c", self.idempotency.retention_s
            payload = _to_json(completed)
        lease = held.lease
        claim = (op, held.idem_key, held.owner, payload, retention_s)
        lease_op = None if lease is None else ("x", lease.key, lease.lease_id, 0)
        if self.defer_settle:
            from workers.celery.backend import Rider, ride_with_result

            keys, args = settle_args(claim=claim, lease=lease_op)  # type: ignore[arg-type]
            ride_with_result(Rider(SETTLE, tuple(keys), tuple(args)))
            return
        self.scripts.settle(claim=claim, lease=lease_op)  # type: ignore[arg-type]

    def _renew(self, held: _Held) -> None:
        # From the lease keeper's thread: claim and lease in one round trip.
        lease = held.lease
        self.scripts.settle(
            claim=("n", held.idem_key, held.owner, self.idempotency.lease_ms, 0),
            lease=None
            if lease is None
            else ("n", lease.key, lease.lease_id, self.concurrency.ttl_ms),
        )

    def deferred(self, ctx: ActionContext, exc: Deferred) -> Reschedule:
        state = state_of(ctx)
        state.deferrals += 1
        if exc.reason == "rate limit":  # exported as actionfleet_rate_limit_deferrals_total
            from workers.ops.metrics import record_rate_limit_deferral

            try:
                record_rate_limit_deferral(self.client, ctx.primitive)
            except Exception:  # a metric must never fail the action
                log.debug("could not count a rate-limit deferral", exc_info=True)
        return Reschedule(exc.wait_s, exc.reason, state.to_dict())

    def settle(
        self, ctx: ActionContext, result: ActionResult, dumped: dict[str, Any] | None = None
    ) -> Reschedule | None:
        """Retry (returns a ``Reschedule``) or make ``result`` final (returns None).

        ``dumped``: ``result.model_dump(mode="json")`` when the caller already has it."""
        state = state_of(ctx)
        action = ctx.action
        error = result.error
        executed = result.status in {"succeeded", "failed", "timed_out"}
        if action is None or error is None or not executed or not error.retryable:
            if executed and dumped is None:
                dumped = result.model_dump(mode="json")
            self.release(ctx, completed=dumped if executed else None)
            return None
        retries = ctx.extra.get("_retries")  # set by admit: only executed actions retry
        attempt = {
            "attempt": ctx.attempt,
            "error": error.model_dump(mode="json"),
            "started_at": ctx.started_at.isoformat(),
            "finished_at": (result.finished_at or datetime.now(UTC)).isoformat(),
            "worker": ctx.worker,
        }
        if retries is not None and error.type in retries.retry_on:
            failures = len(state.attempts) + 1
            if failures < retries.attempts_for(action.primitive):
                delay = backoff_s(retries, failures)
                fits = action.deadline is None or (
                    datetime.now(UTC) + timedelta(seconds=delay) < action.deadline
                )
                if fits:
                    self.release(ctx)
                    state.attempts.append(attempt)
                    return Reschedule(delay, f"{error.type}: {error.message}", state.to_dict())
        if dumped is None:
            dumped = result.model_dump(mode="json")
        self.release(ctx, completed=dumped)
        if error.type != "rate_limited":
            ctx.extra["dead_letter"] = self.dead.put(ctx.raw, [*state.attempts, attempt], dumped)
        return None

    def close(self) -> None:
        self.client.close()


def _over_quota(action: Action, verdict: QuotaVerdict) -> QuotaExceeded:
    assert verdict.resets_at is not None
    what = "actions" if verdict.scope == "all" else f"{verdict.scope} actions"
    return QuotaExceeded(
        f"tenant {action.tenant_id!r} used its {verdict.limit} {what} for this "
        f"month; the quota resets at {verdict.resets_at.isoformat()}: send it "
        "again then, or ask for a larger quota",
        scope=verdict.scope,
        limit=verdict.limit,
        used=verdict.used,
        resets_at=verdict.resets_at.isoformat(),
    )


def _limited(message: str, wait_s: float, limit: str = "rate") -> RateLimited:
    wait = round(wait_s, 3)
    return RateLimited(
        f"{message}; send it again in {wait}s, or use on_limit 'defer' to have the fleet "
        "wait for a slot",
        retryable=True,
        retry_after_s=wait,
        limit=limit,
    )
