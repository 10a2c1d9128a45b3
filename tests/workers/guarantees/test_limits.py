"""Fleet-wide rate limits, concurrency leases and quotas, through real worker processes.

Real redis-server, real Celery worker subprocesses (two where the limit must hold across
workers), the real client; the executor is the TEST-ONLY probe (see
tests/reliability_fixtures.py) so that hundreds of actions fit in seconds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from producer.client import ActionClient
from tests.clock import clear_of_month_end
from tests.conftest import RedisServer
from tests.reliability_fixtures import (
    effects,
    fresh_url,
    probe_action,
    probe_worker,
    runs,
    wait_for,
)
from workers.guarantees.limits import ConcurrencyLimiter, Lease, month_reset, quota_key


def test_rate_limit_holds_across_two_workers_and_spares_other_tenants(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 1), tmp_path / "probe"
    workers = [
        probe_worker(url, tmp_path / f"w{i}", probe, concurrency=2, name=f"rl{i}@localhost")
        for i in range(2)
    ]
    try:
        client = make_client(url)
        # Mixed traffic: one action of another tenant after every ten limited ones.
        mixed = []
        for i in range(200):
            mixed.append(probe_action("rl20"))
            if i % 10 == 0:
                mixed.append(probe_action("acme"))
        handles = client.submit_many(mixed)
        limited = [h for h in handles if h.action.tenant_id == "rl20"]
        free = [h for h in handles if h.action.tenant_id == "acme"]
        results = [h.result(timeout=120) for h in limited + free]
        assert [r.status for r in results] == ["succeeded"] * 220, results
        # Deferrals are not attempts: every action ran once, at its first attempt.
        assert {r.attempt for r in results} == {1}, [r for r in results if r.attempt != 1]
        assert {r.worker for r in results[:200]} == {w.name for w in workers}

        ran = runs(probe)
        times = sorted(r["time"] for r in ran if r["tenant"] == "rl20")
        assert len(times) == 200
        rate = (len(times) - 1) / (times[-1] - times[0])
        # Slots are booked 50 ms apart, so a slow machine can only lower the rate (or
        # raise it slightly by running the very first action late); the lower bound only
        # catches a limiter that throttles far below its limit.
        assert 10.0 <= rate <= 22.0, f"observed {rate:.2f}/s against a limit of 20/s"
        # The other tenant was not held back behind the limited one's queue: its last
        # action (sent right behind the first 191 limited ones) ran well before the
        # limited tenant's last (~10 s after its first at 20/s).
        other = max(r["time"] for r in ran if r["tenant"] == "acme")
        assert other < times[-1] - 2.0, (other - times[0], times[-1] - times[0])
        # ... and operators see the deferrals in the metrics.
        from workers.ops.metrics import RATE_LIMIT_DEFERRALS_KEY

        deferred = redis_own.client(1).hget(RATE_LIMIT_DEFERRALS_KEY, "code")
        assert deferred is not None and int(deferred) > 0
    finally:
        for w in workers:
            w.stop()


def test_on_limit_fail_returns_rate_limited_and_deadline_expires(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 2), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe)
    try:
        client = make_client(url)
        first = client.run(probe_action("rlslow"), timeout=30)
        assert first.status == "succeeded"
        fast = client.run(probe_action("rlslow", on_limit="fail"), timeout=30)
        assert fast.status == "failed" and fast.error is not None
        assert fast.error.type == "rate_limited" and fast.error.retryable
        assert 0 < fast.error.details["retry_after_s"] <= 100.0
        assert "on_limit" in fast.error.message
        # A deferral that could only start after the deadline (its slot is ~100 s away,
        # the deadline 30 s) ends expired at once.
        soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
        late = client.run(probe_action("rlslow", deadline=soon), timeout=30)
        assert late.status == "expired", late
        assert late.error is not None and late.error.type == "timeout"
        assert len(runs(probe)) == 1  # neither refused action ran
        # The per-agent limit applies to each agent separately.
        a1 = client.run(probe_action("agentrl", agent="one", on_limit="fail"), timeout=30)
        a2 = client.run(probe_action("agentrl", agent="two", on_limit="fail"), timeout=30)
        a1b = client.run(probe_action("agentrl", agent="one", on_limit="fail"), timeout=30)
        assert (a1.status, a2.status, a1b.status) == ("succeeded", "succeeded", "failed")
    finally:
        worker.stop()


def _overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    live = peak = 0
    for _, step in points:
        live += step
        peak = max(peak, live)
    return peak


def test_concurrency_limit_holds_across_two_workers(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 3), tmp_path / "probe"
    workers = [probe_worker(url, tmp_path / f"w{i}", probe, concurrency=3) for i in range(2)]
    try:
        client = make_client(url)
        handles = client.submit_many(
            [probe_action("conc2", sleep_s=0.4, effect=True) for _ in range(12)]
        )
        assert [h.result(timeout=120).status for h in handles] == ["succeeded"] * 12
        start = {r["action_id"]: r["time"] for r in runs(probe)}
        from workers.executors.probe import read_log

        end = {e["action_id"]: e["time"] for e in read_log(probe / "effects.log")}
        intervals = [(start[a], end[a]) for a in start]
        assert len(intervals) == 12
        assert _overlap(intervals) == 2  # never more than 2, and the limit was reached
        assert len({r["pid"] for r in runs(probe)}) > 2  # spread over both workers' slots
        key = ConcurrencyLimiter.key("conc2", "code")
        assert redis_own.client(3).zcard(key) == 0  # every lease returned
    finally:
        for w in workers:
            w.stop()


def test_sigkilled_workers_lease_expires_and_the_slot_returns(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 4), tmp_path / "probe"
    settings = {"lease_s": "2", "visibility_timeout_s": "600"}
    first = probe_worker(url, tmp_path / "a", probe, concurrency=1, **settings)
    client = make_client(url)
    long = client.submit(probe_action("conc1", sleep_s=120))
    key = ConcurrencyLimiter.key("conc1", "code")
    r = redis_own.client(4)
    try:
        wait_for(lambda: len(runs(probe)) == 1, 30, "the long action to start")
        assert r.zcard(key) == 1
        for pid in [*first.pool_pids(), first.proc.pid]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        first.proc.wait(10)
    finally:
        first.stop(signal.SIGKILL)
    second = probe_worker(url, tmp_path / "b", probe, concurrency=1, **settings)
    try:
        short = client.run(probe_action("conc1", effect=True), timeout=60)
        assert short.status == "succeeded", short
        assert effects(probe)[short.action_id] == 1
        assert not long.ready()  # the dead worker's action never finished ...
        assert ConcurrencyLimiter(r, 2).holders(key) == []  # ... and holds no slot
    finally:
        second.stop()


def test_quota_boundary_with_real_actions(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 5), tmp_path / "probe"
    r = redis_own.client(5)
    now = clear_of_month_end()  # the worker keys the quota by its own clock's month
    counter = quota_key("quota1k", None, now)
    r.set(counter, 998)  # seeded: 998 actions already ran this month
    worker = probe_worker(url, tmp_path / "w", probe)
    try:
        client = make_client(url)
        from tests.conftest import code_action

        denied = client.run(code_action("x", memory_mb=2048) | {"tenant_id": "quota1k"}, 30)
        assert denied.error is not None and denied.error.type == "policy_denied"
        assert int(r.get(counter) or 0) == 998  # refused by policy: not counted
        results = [client.run(probe_action("quota1k"), timeout=30) for _ in range(3)]
        assert [x.status for x in results] == ["succeeded", "succeeded", "denied"]
        over = results[2].error
        assert over is not None and over.type == "quota_exceeded" and not over.retryable
        assert over.details["limit"] == 1000 and over.details["used"] == 1000
        assert over.details["resets_at"] == month_reset(now).isoformat()
        assert month_reset(now).isoformat() in over.message
        assert int(r.get(counter) or 0) == 1000  # the denied 1,001st did not count
        assert len(runs(probe)) == 2
        assert r.ttl(counter) > (month_reset(now) - now).total_seconds()
    finally:
        worker.stop()


def test_buckets_per_destination_host_and_burst(redis_own: RedisServer) -> None:
    from producer.validation import parse_action
    from workers.guarantees.limits import LimitsPolicy, Rate, RateLimiter, rate_keys

    limits = LimitsPolicy.model_validate(
        {"host_rate": {"per_second": 1, "burst": 3}, "agent_rate": {"per_second": 5}}
    )
    api = parse_action(
        {
            "primitive": "api",
            "tenant_id": "t",
            "agent_id": "a",
            "payload": {"url": "https://API.Example.com:8443/v1/x"},
        }
    )
    email = parse_action(
        {
            "primitive": "email",
            "tenant_id": "t",
            "agent_id": "a",
            "payload": {
                "to": ["x@b.org", "y@A.org"],
                "cc": ["z@b.org"],
                "subject": "s",
                "text": "t",
            },
        }
    )
    assert [k for k, _ in rate_keys(api, limits)] == [
        "af:rate:a:t:a",
        "af:rate:h:t:api.example.com",
    ]
    assert [k for k, _ in rate_keys(email, limits)] == [
        "af:rate:a:t:a",
        "af:rate:h:t:a.org",
        "af:rate:h:t:b.org",
    ]
    r = redis_own.client(6)
    r.flushdb()
    limiter = RateLimiter(r)
    bucket = [("af:rate:burst", Rate(per_second=1, burst=3))]
    # Each wait is checked against when its call was made, so a slow machine cannot
    # move the expected values: the burst is spent at ``start`` (within the first call),
    # and a call made at t must wait for slot k at start + k s, that is start + k - t.
    spans: list[tuple[float, float]] = []

    def acquire(reserve: bool) -> float:
        before = time.monotonic()
        wait = limiter.acquire(bucket, reserve=reserve)
        spans.append((before, time.monotonic()))
        return wait

    def expected(call: int, slot: int) -> tuple[float, float]:
        (b0, a0), (b, a) = spans[0], spans[call]
        return max(0.0, b0 + slot - a) - 0.01, max(0.0, a0 + slot - b) + 0.01

    waits = [acquire(reserve=False) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0], waits
    low, high = expected(3, 1)
    assert waits[3] > 0.0 and low <= waits[3] <= high, (waits, low, high)
    # Booking takes the next slots in order, one interval apart: 1 s, then 2 s.
    booked = [acquire(reserve=True) for _ in range(2)]
    for n, (call, slot) in enumerate([(4, 1), (5, 2)]):
        low, high = expected(call, slot)
        assert low <= booked[n] <= high, (booked, n, low, high)


def test_single_purpose_limiters_run_their_section_of_the_admit_script(
    redis_own: RedisServer,
) -> None:
    """The ops/metrics/test entry points share the guard's one script (one section each)."""
    import pytest
    from pydantic import ValidationError

    from producer.validation import parse_action
    from workers.guarantees.limits import LimitsPolicy, QuotaCounter, QuotaPolicy

    r = redis_own.client(8)
    r.flushdb()
    # Leases of 100 s: the wait for a slot is ~100 s whatever delays the machine adds.
    leases = ConcurrencyLimiter(r, lease_s=100)
    key = ConcurrencyLimiter.key("t", "code")
    assert [leases.acquire(key, holder, 2) for holder in ("a", "b")] == [0.0, 0.0]
    assert 90.0 < leases.acquire(key, "c", 2) <= 100.0  # full: until the first lease ends
    assert leases.acquire(key, "a", 2) == 0.0  # a holder re-acquires its own slot
    assert sorted(leases.holders(key)) == ["a", "b"]
    before = r.zscore(key, "b")
    time.sleep(0.02)
    assert leases.renew(Lease(key, "b")) and r.zscore(key, "b") > before
    leases.release(Lease(key, "b"))
    assert leases.holders(key) == ["a"]
    assert not leases.renew(Lease(key, "b"))  # a released lease is not brought back
    assert leases.holders(key) == ["a"]

    action = parse_action(probe_action("q"))
    quota = QuotaPolicy(monthly=2, primitives={"code": 5})
    now = datetime.now(UTC)
    counter = QuotaCounter(r)
    verdicts = [counter.count(action, quota, now) for _ in range(3)]
    assert [v.ok for v in verdicts] == [True, True, False]
    assert (verdicts[2].scope, verdicts[2].limit, verdicts[2].used) == ("all", 2, 2)
    assert verdicts[2].resets_at == month_reset(now)
    assert int(r.get(quota_key("q", None, now)) or 0) == 2  # the refused one did not count
    assert int(r.get(quota_key("q", "code", now)) or 0) == 2
    assert counter.count(action, QuotaPolicy(), now).ok  # no quota: nothing to count

    # A concurrency limit of 0 would defer forever: the policy refuses it up front.
    with pytest.raises(ValidationError):
        LimitsPolicy.model_validate({"concurrency": {"code": 0}})
