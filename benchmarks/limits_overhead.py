"""Overhead and accuracy of the fleet-wide limits and the idempotency record.

Measured in one run, against a real redis-server:

1. Overhead per action: ``Pipeline.run`` of a no-op action (the TEST-ONLY probe executor)
   without the reliability guard (baseline) and with it (idempotency claim + complete,
   rate limit, concurrency lease, quota count: 5 Redis round trips). Target: < 1 ms p50.
2. Limit accuracy in-process: threads in several processes hammer one bucket configured
   at ``--rate``/s for ``--seconds``; observed granted rate / configured.
3. Limit accuracy through the fleet: two probe worker processes, 20 actions/s configured;
   observed execution rate / configured.

    .venv/bin/python benchmarks/limits_overhead.py [-n 2000] [--rate 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import ROOT, pct, redis_server, table, timed  # noqa: F401

POLICY = """
version: 1
tenants:
  bench:
    limits:
      rate: {code: {per_second: 100000, burst: 100000}}
      agent_rate: {per_second: 100000, burst: 100000}
      concurrency: {code: 1000}
      quota: {monthly: 1000000000}
  bench20:
    limits:
      rate: {code: {per_second: 20, burst: 1}}
"""


def _action(tenant: str = "bench") -> dict[str, Any]:
    return {
        "primitive": "code",
        "tenant_id": tenant,
        "agent_id": "bench",
        "action_id": str(uuid.uuid4()),
        "payload": {"language": "python", "source": "{}"},
    }


class _ProbeRegistry:
    def __init__(self, directory: Path) -> None:
        from workers.executors.probe import ReliabilityProbeExecutor

        self.probe = ReliabilityProbeExecutor(directory)

    def supports(self, primitive: str) -> bool:
        return primitive == "code"

    def get(self, primitive: str) -> Any:
        return self.probe

    def close(self) -> None:
        pass


def overhead(url: str, policy: Path, n: int) -> list[tuple[str, list[float]]]:
    import redis

    from workers.middleware import ActionContext
    from workers.pipeline import Pipeline
    from workers.policy import PolicyEngine
    from workers.reliability import Reliability

    tmp = Path(tempfile.mkdtemp())
    engine = PolicyEngine(policy)
    client = redis.Redis.from_url(url)
    plain = Pipeline(engine, _ProbeRegistry(tmp / "a"))  # type: ignore[arg-type]
    guarded = Pipeline(engine, _ProbeRegistry(tmp / "b"), (), Reliability(client))  # type: ignore[arg-type]

    def run(pipeline: Pipeline) -> None:
        ctx = ActionContext("code", "actions.code", "bench", 1, _action())
        result = pipeline.run(ctx)
        assert result["status"] == "succeeded" and ctx.reschedule is None, result

    rows = [
        ("pipeline, no limits (baseline)", timed(lambda: run(plain), n, warmup=50)),
        ("pipeline + limits + idempotency", timed(lambda: run(guarded), n, warmup=50)),
    ]
    rel = Reliability(client)
    rows.append(
        (
            "  idempotency claim+complete",
            timed(lambda: _idem(rel), n, warmup=50),
        )
    )
    from workers.limits import Rate

    bucket = [("af:rate:bench:solo", Rate(per_second=1e5, burst=100_000))]
    rows.append(
        (
            "  rate limit check (1 bucket)",
            timed(lambda: rel.rate.acquire(bucket, reserve=True), n, 50),
        )
    )
    return rows


def _idem(rel: Any) -> None:
    key = rel.idempotency.key("bench", str(uuid.uuid4()))
    rel.idempotency.claim(key, "me")
    rel.idempotency.complete(key, "me", {"status": "succeeded"})


def _hammer(url: str, rate: float, seconds: float, out: Any) -> None:
    import redis

    from workers.limits import Rate, RateLimiter

    limiter = RateLimiter(redis.Redis.from_url(url))
    bucket = [("af:rate:accuracy", Rate(per_second=rate, burst=1))]
    granted = []
    end = time.time() + seconds
    while time.time() < end:
        if limiter.acquire(bucket, reserve=False) == 0:
            granted.append(time.time())
    out.put(granted)


def accuracy_in_process(url: str, rate: float, seconds: float, procs: int = 4) -> float:
    q: multiprocessing.Queue[list[float]] = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_hammer, args=(url, rate, seconds, q)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    times = sorted(t for _ in workers for t in q.get())
    for w in workers:
        w.join()
    return (len(times) - 1) / (times[-1] - times[0]) / rate


def accuracy_fleet(url: str, policy: Path, actions: int = 100) -> float:
    from _common import celery_worker

    from producer.client import ActionClient
    from producer.config import Settings
    from workers.executors.probe import read_log

    probe = Path(tempfile.mkdtemp())
    env = {
        "ACTIONFLEET_POLICY": str(policy),
        "ACTIONFLEET_TEST_PROBE_EXECUTOR": "1",
        "ACTIONFLEET_TEST_PROBE_DIR": str(probe),
    }
    with celery_worker("workers.app", "actions.code", url, concurrency=2, **env):
        client = ActionClient(url, settings=Settings(broker_url=url))
        handles = client.submit_many([_action("bench20") for _ in range(actions)])
        assert all(h.result(timeout=120).status == "succeeded" for h in handles)
        client.close()
    times = sorted(r["time"] for r in read_log(probe / "runs.log"))
    return (len(times) - 1) / (times[-1] - times[0]) / 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="timed actions per subject")
    parser.add_argument("--rate", type=float, default=200.0, help="in-process bucket rate/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-fleet", action="store_true", help="skip the worker accuracy run")
    args = parser.parse_args()
    policy = Path(tempfile.mkdtemp()) / "policy.yaml"
    policy.write_text(POLICY)
    with redis_server() as url:
        rows = overhead(url, policy, args.n)
        print(table(rows, baseline="pipeline, no limits (baseline)"))
        base, guarded = rows[0][1], rows[1][1]
        extra = pct(guarded, 0.5) - pct(base, 0.5)
        print(
            f"overhead per action: p50 {extra:.3f} ms (target < 1 ms), "
            f"mean {statistics.fmean(guarded) - statistics.fmean(base):.3f} ms"
        )
        ratio = accuracy_in_process(url, args.rate, args.seconds)
        print(
            f"rate accuracy, 4 processes on one {args.rate:g}/s bucket: observed/configured "
            f"{ratio:.3f}"
        )
        if not args.no_fleet:
            fleet = accuracy_fleet(url, policy)
            print(f"rate accuracy, 2 probe workers at 20/s: observed/configured {fleet:.3f}")
    print(json.dumps({"overhead_p50_ms": round(extra, 3), "accuracy_in_process": round(ratio, 3)}))


if __name__ == "__main__":
    main()
