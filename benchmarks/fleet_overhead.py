"""Fleet overhead: trivial actions (files `stat`) through the whole pipeline — validation,
policy, rate-limit and idempotency checks, audit emission — beside bare Celery no-op tasks
on the same broker, worker count and concurrency, in the same run. Also scale-out (two
worker processes vs one) and resident memory per worker process.

    .venv/bin/python benchmarks/fleet_overhead.py [-n 2000] [--concurrency 2] [--repeat 3]

Throughput is measured two ways, each for the baseline and the subject:
- drain: N messages are queued while the workers' consumers are cancelled, then the
  consumers are added back and the clock runs until every message is acknowledged. This
  is the workers' own capacity (what scaling out adds), with no client competing for
  the CPU.
- closed loop: the client submits N and waits for every result, as an agent would. On
  one 2-core machine the client's own CPU (Celery's send path, the result listener) is
  part of the number.
The bench tenant has a rate limit, a concurrency limit and a monthly quota (set far above
what the run uses) so the limit checks really run; audit events go to the Redis stream.
Each figure is the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from _common import WORKER_PIDS, celery_worker, children, pct, redis_server, rss_mb, timed

POLICY = """
version: 1
default:
  limits:
    rate: {files: {per_second: 100000, burst: 100000}}
    agent_rate: {per_second: 100000, burst: 100000}
    concurrency: {files: 1000}
    quota: {monthly: 100000000}
"""
STAT = {
    "primitive": "files",
    "tenant_id": "bench",
    "agent_id": "bench",
    "payload": {"op": "stat", "path": "hello.txt"},
}


def queue_keys(queue: str, priorities: bool) -> list[str]:
    from producer.transport import redis_queue_keys

    return redis_queue_keys(queue) if priorities else [queue]


def drained(r: object, keys: list[str]) -> bool:
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for key in keys:
        pipe.llen(key)
    pipe.hlen("unacked")
    return not any(pipe.execute())


def drain(
    app: object,
    r: object,
    queue: str,
    names: list[str],
    priorities: bool,
    publish: Callable[[], list],
    check: Callable[[object], None],
) -> float:
    """Actions/s of the workers ``names`` emptying a queue filled while they were idle."""
    control = app.control  # type: ignore[attr-defined]
    control.cancel_consumer(queue, destination=names, reply=True)
    handles = publish()
    keys = queue_keys(queue, priorities)
    start = time.perf_counter()
    control.add_consumer(queue, destination=names, reply=True)
    while True:
        # A message is briefly in neither the list nor the unacked hash between its pop
        # and its bookkeeping: three empty looks in a row, 1 ms apart, rule that out.
        if all(drained(r, keys) or time.sleep(0.001) for _ in range(3)):
            break
        time.sleep(0.002)
    elapsed = time.perf_counter() - start - 0.002
    for h in handles:  # outside the clock: every one finished, and as expected
        check(h)
    return len(handles) / elapsed


def closed_loop(publish: Callable[[], list], check: Callable[[object], None]) -> float:
    start = time.perf_counter()
    handles = publish()
    for h in handles:
        check(h)
    return len(handles) / (time.perf_counter() - start)


def median_of(repeat: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    runs = [fn() for _ in range(repeat)]
    return statistics.median(runs), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="actions per throughput run")
    parser.add_argument("--latency-n", type=int, default=300, help="sequential round trips")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    args = parser.parse_args()

    import redis
    from celery import Celery

    from producer.client import ActionClient
    from producer.config import Settings

    home = tempfile.mkdtemp(prefix="af-bench-")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {"ACTIONFLEET_HOME": home, "ACTIONFLEET_POLICY": str(policy)}
    write = STAT | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
    n, c, rep = args.n, args.concurrency, args.repeat
    rows: list[tuple[str, float, list[float]]] = []
    lat: dict[str, list[float]] = {}
    mem: list[str] = []

    def fleet_ok(h: object) -> None:
        result = h.result(timeout=300)  # type: ignore[attr-defined]
        assert result.status == "succeeded", result

    def noop_ok(h: object) -> None:
        h.get(timeout=300)  # type: ignore[attr-defined]

    with redis_server() as url:
        r = redis.Redis.from_url(url)
        noop = Celery(set_as_current=False, broker=url, backend=url)
        client = ActionClient(url, settings=Settings(broker_url=url))

        def noop_all() -> list:
            return [noop.send_task("bench.noop", queue="bench") for _ in range(n)]

        def stat_all() -> list:
            return client.submit_many([dict(STAT) for _ in range(n)])

        def both(label: str, app_ctl: object, queue: str, names: list[str], fleet: bool) -> None:
            publish, check = (stat_all, fleet_ok) if fleet else (noop_all, noop_ok)
            rows.append(
                (
                    f"{label}, drain",
                    *median_of(rep, lambda: drain(app_ctl, r, queue, names, fleet, publish, check)),
                )
            )
            rows.append(
                (f"{label}, closed loop", *median_of(rep, lambda: closed_loop(publish, check)))
            )

        with celery_worker("benchmarks.noop_app", "bench", url, c) as name:
            lat["bare Celery no-op"] = timed(
                lambda: noop.send_task("bench.noop", queue="bench").get(timeout=30),
                args.latency_n,
            )
            both("bare Celery no-op", noop, "bench", [name], fleet=False)
        with celery_worker("workers.app", "actions.files", url, c, **env) as name:
            assert client.run(write, timeout=60).status == "succeeded"
            lat["fleet files stat"] = timed(lambda: client.run(STAT, timeout=30), args.latency_n)
            both("fleet files stat", noop, "actions.files", [name], fleet=True)
            main_pid = WORKER_PIDS[name]
            mem.append(f"worker main process {rss_mb(main_pid):.0f} MB")
            for i, child in enumerate(children(main_pid)):
                mem.append(f"pool process {i} {rss_mb(child):.0f} MB")

        # Scale-out: a worker process with one execution slot, then two of them.
        scale: list[tuple[str, float, list[float]]] = []
        with ExitStack() as stack:
            names = [
                stack.enter_context(
                    celery_worker("workers.app", "actions.files", url, 1, tag="-s1", **env)
                )
            ]
            client.run(STAT, timeout=60)
            scale.append(
                (
                    "1 worker process",
                    *median_of(
                        rep,
                        lambda: drain(noop, r, "actions.files", names, True, stat_all, fleet_ok),
                    ),
                )
            )
            names.append(
                stack.enter_context(
                    celery_worker("workers.app", "actions.files", url, 1, tag="-s2", **env)
                )
            )
            scale.append(
                (
                    "2 worker processes",
                    *median_of(
                        rep,
                        lambda: drain(noop, r, "actions.files", names, True, stat_all, fleet_ok),
                    ),
                )
            )
        client.close()
        noop.close()

    print(f"{'subject':<36} {'actions/s':>10} {'ratio':>7}   runs")
    for kind in ("drain", "closed loop"):
        base = next(rate for label, rate, _ in rows if label == f"bare Celery no-op, {kind}")
        for label, rate, runs in rows:
            if label.endswith(kind):
                spread = " ".join(f"{x:.0f}" for x in runs)
                print(f"{label:<36} {rate:>10.1f} {rate / base:>7.2f}   {spread}")
    print(f"(n={n}, 1 worker, concurrency={c}; ratios against bare Celery measured the same way)")
    b50 = pct(lat["bare Celery no-op"], 0.5)
    for label, samples in lat.items():
        print(
            f"latency {label:<24} p50 {pct(samples, 0.5):7.2f} ms  p90 {pct(samples, 0.9):7.2f} ms"
            f"  p50/bare {pct(samples, 0.5) / b50:5.2f}"
        )
    one = scale[0][1]
    for label, rate, runs in scale:
        spread = " ".join(f"{x:.0f}" for x in runs)
        print(
            f"scale-out (drain, concurrency 1): {label:<20} {rate:8.1f}/s"
            f"  x{rate / one:.2f}   {spread}"
        )
    print("resident memory: " + ", ".join(mem))


if __name__ == "__main__":
    main()
