"""Overhead and accuracy of the fleet-wide limits and the idempotency record.

Measured in one run, against a real redis-server:

1. Cost per action of the reliability guard (``Reliability.admit`` + ``settle``):
   ``Pipeline.run`` of a no-op action (the TEST-ONLY probe executor) without the guard
   (baseline), with the guard and no limits configured (idempotency only), and with a
   rate limit (tenant x primitive and agent buckets), a concurrency limit and a monthly
   quota configured. For each: wall time per action (p50, mean), client CPU per action
   (``time.process_time``: this process, i.e. pipeline + redis-py, not redis-server), and
   Redis round trips per action counted from redis-server's ``INFO commandstats`` (a
   script call counts once; the commands it runs inside Redis are not round trips) and
   cross-checked against the requests the client sent. ``--rounds`` interleaved rounds
   give the spread. Target: < 1 ms p50 added; one round trip in admit, one in settle.
2. Limit accuracy in-process: several processes hammer one bucket configured at
   ``--rate``/s for ``--seconds``; observed granted rate / configured.
3. Limit accuracy through the fleet: two probe worker processes, 20 actions/s configured;
   observed execution rate / configured.

    .venv/bin/python benchmarks/limits_overhead.py [-n 2000] [--rounds 3] [--no-fleet]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from _common import ROOT, pct

POLICY = """
version: 1
tenants:
  bench:
    limits:
      rate: {code: {per_second: 100000, burst: 100000}}
      agent_rate: {per_second: 100000, burst: 100000}
      concurrency: {code: 1000}
      quota: {monthly: 1000000000, primitives: {code: 1000000000}}
  benchfree: {}
  bench20:
    limits:
      rate: {code: {per_second: 20, burst: 1}}
"""

# The modules whose Lua scripts the guard runs: the commands those scripts call inside
# Redis show up in commandstats too, but they are not round trips.
_SCRIPT_MODULES = ("limits.py", "idempotency.py", "admission.py")
_NOT_OURS = {"info", "config|resetstat"}


def _script_commands() -> set[str]:
    names: set[str] = set()
    for module in _SCRIPT_MODULES:
        path = ROOT / "workers" / module
        if path.exists():
            names |= {m.lower() for m in re.findall(r"redis\.call\('(\w+)'", path.read_text())}
    return names


def _commandstats(client: redis.Redis) -> dict[str, int]:
    raw = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in raw.items()}


class CountingRedis(redis.Redis):
    """Counts the requests this client sends (one per ``execute_command``)."""

    sent = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return super().execute_command(*args, **options)


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


@dataclass
class Subject:
    name: str
    tenant: str
    pipeline: Any
    client: CountingRedis | None
    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # per round: CPU ms per action
    trips: list[float] = field(default_factory=list)  # per round: server-counted
    sent: list[float] = field(default_factory=list)  # per round: client-counted
    by_command: dict[str, float] = field(default_factory=dict)


def _round(subject: Subject, n: int, stats: redis.Redis, inner: set[str]) -> None:
    from workers.middleware import ActionContext

    def run() -> None:
        ctx = ActionContext("code", "actions.code", "bench", 1, _action(subject.tenant))
        result = subject.pipeline.run(ctx)
        assert result["status"] == "succeeded" and ctx.reschedule is None, result

    for _ in range(20):  # warm-up: scripts loaded, connections open
        run()
    before = _commandstats(stats)
    sent_before = subject.client.sent if subject.client else 0
    cpu = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        run()
        subject.wall_ms.append((time.perf_counter() - t) * 1000)
    subject.cpu_ms.append((time.process_time() - cpu) * 1000 / n)
    after = _commandstats(stats)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if k not in _NOT_OURS}
    delta = {k: v for k, v in delta.items() if v}
    trips = sum(v for k, v in delta.items() if k not in inner)
    subject.trips.append(trips / n)
    subject.sent.append(((subject.client.sent if subject.client else 0) - sent_before) / n)
    subject.by_command = {k: round(v / n, 2) for k, v in sorted(delta.items())}


def overhead(url: str, policy: Path, n: int, rounds: int) -> list[Subject]:
    from workers.pipeline import Pipeline
    from workers.policy import PolicyEngine
    from workers.reliability import Reliability

    tmp = Path(tempfile.mkdtemp())
    engine = PolicyEngine(policy)
    stats = redis.Redis.from_url(url)

    def guarded(name: str, tenant: str) -> Subject:
        client = CountingRedis.from_url(url)
        registry = _ProbeRegistry(tmp / tenant)
        pipeline = Pipeline(engine, registry, (), Reliability(client))  # type: ignore[arg-type]
        return Subject(name, tenant, pipeline, client)

    subjects = [
        Subject(
            "pipeline, no guard (baseline)",
            "bench",
            Pipeline(engine, _ProbeRegistry(tmp / "plain")),  # type: ignore[arg-type]
            None,
        ),
        guarded("+ guard, no limits", "benchfree"),
        guarded("+ guard, rate+concurrency+quota", "bench"),
    ]
    inner = _script_commands()
    for _ in range(rounds):  # interleaved, so machine noise hits every subject alike
        for subject in subjects:
            _round(subject, n // rounds, stats, inner)
    return subjects


def report(subjects: list[Subject]) -> dict[str, Any]:
    base = subjects[0]
    b50, bcpu = pct(base.wall_ms, 0.5), statistics.fmean(base.cpu_ms)
    print(
        f"{'subject':<34} {'p50 ms':>7} {'mean ms':>8} {'+p50 ms':>8} {'CPU ms':>7} "
        f"{'+CPU ms':>8} {'round trips':>12} {'(client)':>9}"
    )
    summary: dict[str, Any] = {}
    for s in subjects:
        p50 = pct(s.wall_ms, 0.5)
        cpu = statistics.fmean(s.cpu_ms)
        spread = f"{min(s.cpu_ms):.3f}-{max(s.cpu_ms):.3f}"
        print(
            f"{s.name:<34} {p50:>7.3f} {statistics.fmean(s.wall_ms):>8.3f} {p50 - b50:>8.3f} "
            f"{cpu:>7.3f} {cpu - bcpu:>8.3f} {statistics.fmean(s.trips):>12.2f} "
            f"{statistics.fmean(s.sent):>9.2f}   CPU/round {spread}"
        )
        summary[s.name] = {
            "added_p50_ms": round(p50 - b50, 3),
            "added_cpu_ms": round(cpu - bcpu, 3),
            "added_cpu_ms_rounds": [
                round(c - b, 3) for c, b in zip(s.cpu_ms, base.cpu_ms, strict=True)
            ],
            "round_trips": round(statistics.fmean(s.trips), 2),
        }
    for s in subjects[1:]:
        print(f"  {s.name}: commands per action (incl. inside scripts) {s.by_command}")
    return summary


def _hammer(url: str, rate: float, seconds: float, out: Any) -> None:
    from workers.guarantees.limits import Rate, RateLimiter

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
    from workers.config import Settings
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
    from _common import redis_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="timed actions per subject")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (spread)")
    parser.add_argument("--rate", type=float, default=200.0, help="in-process bucket rate/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-fleet", action="store_true", help="skip the worker accuracy run")
    parser.add_argument("--no-accuracy", action="store_true", help="overhead only")
    args = parser.parse_args()
    policy = Path(tempfile.mkdtemp()) / "policy.yaml"
    policy.write_text(POLICY)
    out: dict[str, Any] = {}
    with redis_server() as url:
        out["overhead"] = report(overhead(url, policy, args.n, args.rounds))
        if not args.no_accuracy:
            ratio = accuracy_in_process(url, args.rate, args.seconds)
            print(
                f"rate accuracy, 4 processes on one {args.rate:g}/s bucket: "
                f"observed/configured {ratio:.3f}"
            )
            out["accuracy_in_process"] = round(ratio, 3)
            if not args.no_fleet:
                fleet = accuracy_fleet(url, policy)
                print(f"rate accuracy, 2 probe workers at 20/s: observed/configured {fleet:.3f}")
                out["accuracy_fleet"] = round(fleet, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
