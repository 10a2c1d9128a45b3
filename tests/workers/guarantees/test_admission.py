"""The reliability guard on its own (workers/reliability.py + workers/guarantees/admission.py), in
process against a real redis-server: one atomic ADMIT script before the executor, one
SETTLE after it, and what a refusal leaves behind (nothing)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.errors import QuotaExceeded, RateLimited
from producer.models import Action, ActionResult
from producer.validation import parse_action
from tests.clock import clear_of_month_end
from tests.conftest import RedisServer
from tests.reliability_fixtures import (
    probe_action,
)
from workers.guarantees.admission import ADMIT, SETTLE
from workers.guarantees.idempotency import IdempotencyStore
from workers.guarantees.limits import ConcurrencyLimiter, month_reset, quota_key
from workers.middleware import ActionContext
from workers.policy import Grant, PolicyEngine
from workers.reliability import Deferred, Duplicate, Reliability, state_of

# -- the guard on its own: one atomic script before the executor, one after ------------

GUARD_POLICY = """
version: 1
tenants:
  busy1:
    limits:
      rate: {code: {per_second: 1000, burst: 1000}}
      agent_rate: {per_second: 1000, burst: 1000}
      concurrency: {code: 1}
      quota: {monthly: 3, primitives: {code: 100}}
  slow:
    limits:
      rate: {code: {per_second: 0.01, burst: 1}}
      concurrency: {code: 1}
      quota: {monthly: 100}
"""


class _CountingConnection(redis.Connection):
    """A real connection that counts the requests sent on it (one per round trip here),
    through redis-py's command path or straight on the connection (PinnedScript); a new
    connection's handshake (CLIENT SETINFO, SELECT) is not counted."""

    sent = 0
    _handshake = False

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._handshake = True
        try:
            super().on_connect_check_health(check_health)
        finally:
            self._handshake = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._handshake:
            _CountingConnection.sent += 1
        super().send_packed_command(command, check_health)


@dataclass
class _Guard:
    rel: Reliability
    engine: PolicyEngine
    client: redis.Redis
    peek: redis.Redis

    def ctx(self, tenant: str, **spec: Any) -> tuple[ActionContext, Action, Grant]:
        raw = probe_action(tenant, **spec)
        action = parse_action(raw)
        ctx = ActionContext("code", "actions.code", "guard-test", 1, raw)
        ctx.action = action
        return ctx, action, self.engine.authorize(action)

    def admit(self, ctx: ActionContext, action: Action, grant: Grant) -> int:
        """Round trips the admit took (it raises what ``Reliability.admit`` raises)."""
        before = _CountingConnection.sent
        try:
            self.rel.admit(ctx, action, grant)
        finally:
            self.trips = _CountingConnection.sent - before
        return self.trips

    def settle(self, ctx: ActionContext, status: str = "succeeded", error: Any = None) -> int:
        result = ActionResult(
            action_id=ctx.action_id or "", primitive="code", status=status, error=error
        )
        before = _CountingConnection.sent
        ctx.reschedule = self.rel.settle(ctx, result)
        return _CountingConnection.sent - before

    def claim(self, action: Action) -> dict[str, Any] | None:
        raw = self.peek.get(IdempotencyStore.key(action.tenant_id, action.idempotency_key or ""))
        return None if raw is None else json.loads(raw)

    def leases(self, tenant: str) -> list[str]:
        key = ConcurrencyLimiter.key(tenant, "code")
        return [m.decode() for m in self.peek.zrange(key, 0, -1)]

    def rate(self, tenant: str) -> int | None:
        raw = self.peek.get(f"af:rate:t:{tenant}:code")
        return None if raw is None else int(raw)

    def quota(self, tenant: str) -> int:
        return int(self.peek.get(quota_key(tenant, None, datetime.now(UTC))) or 0)

    trips: int = 0


@pytest.fixture
def guard(redis_own: RedisServer, tmp_path: Path) -> Iterator[_Guard]:
    # The guard keys quotas by the clock's month, and so do the checks here: keep the
    # whole test inside one month.
    clear_of_month_end()
    redis_own.client(7).flushdb()
    policy = tmp_path / "policy.yaml"
    policy.write_text(GUARD_POLICY)
    client = redis.Redis.from_url(redis_own.url(7), connection_class=_CountingConnection)
    rel = Reliability(client)
    for script in (ADMIT, SETTLE):  # as on a running worker: the first call loads them
        client.script_load(script)
    peek = redis_own.client(7)
    yield _Guard(rel, PolicyEngine(policy), client, peek)
    rel.close()
    peek.close()


def _commandstats(r: redis.Redis) -> Counter[str]:
    return Counter({k: int(v["calls"]) for k, v in r.info("commandstats").items()})


def test_admit_and_settle_are_one_round_trip_each_with_every_limit_configured(
    guard: _Guard,
) -> None:
    ctx, action, grant = guard.ctx("busy1", effect=True)
    before = _commandstats(guard.peek)
    assert guard.admit(ctx, action, grant) == 1
    after_admit = _commandstats(guard.peek)
    assert guard.settle(ctx) == 1
    after = _commandstats(guard.peek)
    # Seen by redis-server too: one script call each, nothing sent beside it.
    assert after_admit["cmdstat_evalsha"] - before["cmdstat_evalsha"] == 1
    assert after["cmdstat_evalsha"] - after_admit["cmdstat_evalsha"] == 1
    # ... and the script did every step: claim, both rate buckets, lease, both quotas.
    record = guard.claim(action)
    assert record is not None and record["s"] == "c"
    assert json.loads(record["r"])["status"] == "succeeded"
    assert guard.rate("busy1") is not None and guard.peek.get("af:rate:a:busy1:tester")
    assert guard.quota("busy1") == 1
    assert int(guard.peek.get(quota_key("busy1", "code", datetime.now(UTC))) or 0) == 1
    assert guard.leases("busy1") == []  # settle removed the lease
    assert guard.rel.keeper._renewals == {}  # and stopped renewing


def test_a_refused_admit_leaves_no_claim_lease_token_or_count_behind(guard: _Guard) -> None:
    first, action, grant = guard.ctx("busy1")
    guard.admit(first, action, grant)
    owner = guard.leases("busy1")
    assert len(owner) == 1 and guard.quota("busy1") == 1
    token = guard.rate("busy1")

    # Concurrency full: deferred, and nothing of it stays in Redis -- not even the rate
    # token it passed on the way (the script writes only once every check passed).
    second, action2, grant2 = guard.ctx("busy1")
    with pytest.raises(Deferred) as deferred:
        guard.admit(second, action2, grant2)
    assert deferred.value.reason == "concurrency limit" and guard.trips == 1
    assert 0 < deferred.value.wait_s <= 0.75  # a poll (0.5 s with jitter), not the lease
    assert guard.claim(action2) is None
    assert guard.leases("busy1") == owner
    assert guard.rate("busy1") == token and guard.quota("busy1") == 1
    assert "_held" not in second.extra

    # Fail fast on the same limit: rate_limited with details.limit = concurrency.
    fast, action3, grant3 = guard.ctx("busy1", on_limit="fail")
    with pytest.raises(RateLimited) as limited:
        guard.admit(fast, action3, grant3)
    assert limited.value.to_info()["details"]["limit"] == "concurrency"
    assert guard.claim(action3) is None and guard.leases("busy1") == owner

    # Quota full (3 a month; 2 more actions run first): denied with the counts.
    assert guard.settle(first) == 1
    for _ in range(2):
        ok, a, g = guard.ctx("busy1")
        guard.admit(ok, a, g)
        guard.settle(ok)
    assert guard.quota("busy1") == 3
    token = guard.rate("busy1")
    over, action4, grant4 = guard.ctx("busy1")
    with pytest.raises(QuotaExceeded) as exceeded:
        guard.admit(over, action4, grant4)
    details = exceeded.value.to_info()["details"]
    assert (details["scope"], details["limit"], details["used"]) == ("all", 3, 3)
    assert details["resets_at"] == month_reset(datetime.now(UTC)).isoformat()
    assert guard.claim(action4) is None and guard.leases("busy1") == []
    assert guard.rate("busy1") == token and guard.quota("busy1") == 3
    assert not state_of(over).quota_counted


def test_a_rate_deferral_books_its_slot_and_nothing_else(guard: _Guard) -> None:
    first, action, grant = guard.ctx("slow")
    guard.admit(first, action, grant)
    guard.settle(first)
    token = guard.rate("slow")
    assert token is not None

    # Over 0.01/s (one per 100 s, so no delay of the machine's reaches the next slot):
    # fail fast takes nothing ...
    fast, action2, grant2 = guard.ctx("slow", on_limit="fail")
    with pytest.raises(RateLimited) as limited:
        guard.admit(fast, action2, grant2)
    assert 90.0 < limited.value.to_info()["details"]["retry_after_s"] <= 100.0
    assert guard.rate("slow") == token and guard.claim(action2) is None

    # ... a deferral books the next slot (one interval, 100 s, further), holds nothing.
    later, action3, grant3 = guard.ctx("slow")
    with pytest.raises(Deferred) as deferred:
        guard.admit(later, action3, grant3)
    assert deferred.value.reason == "rate limit" and 90.0 < deferred.value.wait_s <= 100.0
    booked = guard.rate("slow")
    assert booked == token + 100_000_000
    assert state_of(later).rate_booked and not state_of(later).quota_counted
    assert guard.claim(action3) is None and guard.leases("slow") == []
    assert guard.quota("slow") == 1

    # Its re-delivery runs in the booked slot without touching the bucket again.
    again = ActionContext("code", "actions.code", "guard-test", 1, later.raw)
    again.action = action3
    again.extra["retry_state"] = state_of(later)
    assert guard.admit(again, action3, grant3) == 1
    assert guard.rate("slow") == booked and not state_of(again).rate_booked
    assert guard.quota("slow") == 2 and len(guard.leases("slow")) == 1
    guard.settle(again)


def test_duplicates_and_release_go_through_the_same_two_scripts(guard: _Guard) -> None:
    ctx, action, grant = guard.ctx("busy1", idempotency_key="dup-1")
    guard.admit(ctx, action, grant)
    record = guard.claim(action)
    assert record is not None and record["s"] == "p"

    # The same key while it runs: deferred, the holder's claim and lease untouched.
    twin, action2, grant2 = guard.ctx("busy1", idempotency_key="dup-1")
    with pytest.raises(Deferred) as deferred:
        guard.admit(twin, action2, grant2)
    assert deferred.value.reason == "a duplicate is running" and guard.trips == 1
    assert guard.claim(action) == record and len(guard.leases("busy1")) == 1
    assert guard.quota("busy1") == 1

    # The lease keeper's renewal: claim and lease together, in one round trip.
    held = ctx.extra["_held"]
    score = guard.peek.zscore(ConcurrencyLimiter.key("busy1", "code"), held.owner)
    time.sleep(0.05)
    # The claim nearly lapsed: the renewal must give it a whole lease again (10 s), a
    # margin no scheduling delay between the renewal and the check comes near.
    guard.peek.pexpire(IdempotencyStore.key("busy1", "dup-1"), 1_000)
    sent = _CountingConnection.sent
    guard.rel._renew(held)
    assert _CountingConnection.sent - sent == 1
    assert guard.peek.zscore(ConcurrencyLimiter.key("busy1", "code"), held.owner) > score
    assert guard.peek.pttl(IdempotencyStore.key("busy1", "dup-1")) > 5_000

    # A retryable failure that will be retried frees the claim and the lease (one trip).
    failed = {"type": "upstream_error", "message": "x", "retryable": True}
    assert guard.settle(ctx, "failed", failed) == 1
    assert ctx.reschedule is not None
    assert guard.claim(action) is None and guard.leases("busy1") == []

    # Completed: a later delivery gets the stored result and holds nothing.
    guard.admit(twin, action2, grant2)
    guard.settle(twin)
    third, action3, grant3 = guard.ctx("busy1", idempotency_key="dup-1")
    with pytest.raises(Duplicate) as dup:
        guard.admit(third, action3, grant3)
    assert dup.value.result["action_id"] == action2.action_id
    assert guard.leases("busy1") == [] and guard.quota("busy1") == 2
