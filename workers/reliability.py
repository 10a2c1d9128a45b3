"""The pipeline's reliability guard: limits, quotas, idempotency, retries, dead letters.

The pipeline calls it at two points (see ``workers.pipeline``):

``admit`` (after policy, right before the executor), in this order:
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

``settle`` (once the result is known): releases the leases, then either schedules a
retry (retryable error in ``retries.retry_on``, attempts left, deadline allows) or makes
the result final: stored in the idempotency record when the executor ran, and
dead-lettered when it is a retryable failure whose retries ran out.

State that must survive a re-queue (earlier attempts, whether the quota was counted,
whether a rate slot is booked) travels in the task's ``retry_state`` keyword argument.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from producer.config import Settings
from producer.errors import DeadlinePassed, QuotaExceeded, RateLimited
from producer.models import Action, ActionResult
from workers.deadletter import DeadLetterStore
from workers.idempotency import IdempotencyStore
from workers.leasekeeper import LeaseKeeper
from workers.limits import ConcurrencyLimiter, Lease, QuotaCounter, RateLimiter, rate_keys
from workers.middleware import ActionContext
from workers.policy import Grant
from workers.retries import backoff_s

log = logging.getLogger(__name__)

__all__ = ["Deferred", "Duplicate", "Reliability", "Reschedule", "RetryState"]

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


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Re-queue the same message after ``countdown_s`` with ``state``."""

    countdown_s: float
    reason: str
    state: dict[str, Any]


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
    idem_key: str
    owner: str
    handles: list[int] = field(default_factory=list)
    lease: Lease | None = None


def state_of(ctx: ActionContext) -> RetryState:
    state = ctx.extra.get("retry_state")
    if not isinstance(state, RetryState):
        state = RetryState.from_dict(state if isinstance(state, dict) else None)
        ctx.extra["retry_state"] = state
    return state


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
        self.keeper = LeaseKeeper(lease_s / 3)
        self.max_defer_s = max_defer_s

    @classmethod
    def from_settings(cls, settings: Settings, broker_url: str) -> Reliability:
        client = redis.Redis.from_url(
            settings.limits_redis_url or broker_url,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=10,
            retry_on_timeout=True,
        )
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
        ``ActionError`` (rate_limited, quota_exceeded, expired)."""
        state = state_of(ctx)
        owner = f"{ctx.worker}:{os.getpid()}:{ctx.trace_id}"
        held = _Held(IdempotencyStore.key(action.tenant_id, action.idempotency_key or ""), owner)
        claim = self.idempotency.claim(held.idem_key, owner)
        if claim.state == "completed":
            assert claim.result is not None
            raise Duplicate(claim.result)
        if claim.state == "busy":
            raise self._defer(action, min(claim.wait_s, POLL_S), "a duplicate is running")
        ctx.extra["_held"] = held
        held.handles.append(self.keeper.hold(lambda: self.idempotency.renew(held.idem_key, owner)))
        ctx.extra["idempotency_key"] = action.idempotency_key
        ctx.extra["_retries"] = grant.tenant.retries
        try:
            self._limits(ctx, action, grant, state, held)
        except BaseException:
            self.release(ctx)
            raise

    def _limits(
        self, ctx: ActionContext, action: Action, grant: Grant, state: RetryState, held: _Held
    ) -> None:
        limits = grant.tenant.limits
        fail_fast = action.on_limit == "fail"
        buckets = rate_keys(action, limits)
        if state.rate_booked:
            state.rate_booked = False  # this delivery runs in the slot booked for it
        elif buckets:
            wait = self.rate.acquire(buckets, reserve=not fail_fast)
            if wait > 0:
                if fail_fast:
                    raise _limited(f"tenant {action.tenant_id!r} is over its rate limit", wait)
                state.rate_booked = True
                raise self._defer(action, wait, "rate limit")
        if (limit := limits.concurrency.get(action.primitive)) is not None:
            key = ConcurrencyLimiter.key(action.tenant_id, action.primitive)
            wait = self.concurrency.acquire(key, held.owner, limit)
            if wait > 0:
                if fail_fast:
                    raise _limited(
                        f"tenant {action.tenant_id!r} already runs {limit} {action.primitive} "
                        "actions at once (its concurrency limit)",
                        min(wait, POLL_S),
                        limit="concurrency",
                    )
                raise self._defer(action, min(wait, POLL_S), "concurrency limit")
            held.lease = Lease(key, held.owner)
            lease = held.lease
            held.handles.append(self.keeper.hold(lambda: self.concurrency.renew(lease)))
        if not state.quota_counted:
            now = datetime.now(UTC)
            verdict = self.quota.count(action, limits.quota, now)
            if not verdict.ok:
                assert verdict.resets_at is not None
                what = "actions" if verdict.scope == "all" else f"{verdict.scope} actions"
                raise QuotaExceeded(
                    f"tenant {action.tenant_id!r} used its {verdict.limit} {what} for this "
                    f"month; the quota resets at {verdict.resets_at.isoformat()}: send it "
                    "again then, or ask for a larger quota",
                    scope=verdict.scope,
                    limit=verdict.limit,
                    used=verdict.used,
                    resets_at=verdict.resets_at.isoformat(),
                )
            state.quota_counted = True

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
        """Free the leases; record ``completed`` as the key's result, or free the claim."""
        held = ctx.extra.pop("_held", None)
        if not isinstance(held, _Held):
            return
        for handle in held.handles:
            self.keeper.drop(handle)
        if held.lease is not None:
            self.concurrency.release(held.lease)
        if completed is not None:
            self.idempotency.complete(held.idem_key, held.owner, completed)
        else:
            self.idempotency.release(held.idem_key, held.owner)

    def deferred(self, ctx: ActionContext, exc: Deferred) -> Reschedule:
        state = state_of(ctx)
        state.deferrals += 1
        if exc.reason == "rate limit":  # exported as actionfleet_rate_limit_deferrals_total
            from workers.metrics import record_rate_limit_deferral

            try:
                record_rate_limit_deferral(self.client, ctx.primitive)
            except Exception:  # a metric must never fail the action
                log.debug("could not count a rate-limit deferral", exc_info=True)
        return Reschedule(exc.wait_s, exc.reason, state.to_dict())

    def settle(self, ctx: ActionContext, result: ActionResult) -> Reschedule | None:
        """Retry (returns a ``Reschedule``) or make ``result`` final (returns None)."""
        state = state_of(ctx)
        action = ctx.action
        error = result.error
        executed = result.status in {"succeeded", "failed", "timed_out"}
        if action is None or error is None or not executed or not error.retryable:
            self.release(ctx, completed=result.model_dump(mode="json") if executed else None)
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
        self.release(ctx, completed=result.model_dump(mode="json"))
        if error.type != "rate_limited":
            ctx.extra["dead_letter"] = self.dead.put(
                ctx.raw, [*state.attempts, attempt], result.model_dump(mode="json")
            )
        return None

    def close(self) -> None:
        self.client.close()


def _limited(message: str, wait_s: float, limit: str = "rate") -> RateLimited:
    wait = round(wait_s, 3)
    return RateLimited(
        f"{message}; send it again in {wait}s, or use on_limit 'defer' to have the fleet "
        "wait for a slot",
        retryable=True,
        retry_after_s=wait,
        limit=limit,
    )
