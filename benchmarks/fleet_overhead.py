"""Fleet overhead: trivial actions (files `stat`) through the whole pipeline — validation,
policy, rate-limit and idempotency checks, audit emission — beside bare Celery no-op tasks
on the same broker, worker count and concurrency, in the same run. Also scale-out (two
worker processes vs one) and resident memory per worker process.

    .venv/bin/python benchmarks/fleet_overhead.py [-n 2000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack

from _common import (
    WORKER_PIDS,
    celery_worker,
    children,
    pct,
    redis_server,
    rss_mb,
    timed,
)


def throughput(submit_all: Callable[[], list], wait: Callable[[object], object]) -> float:
    start = time.perf_counter()
    handles = submit_all()
    for h in handles:
        wait(h)
    return len(handles) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="actions per throughput run")
    parser.add_argument("--latency-n", type=int, default=200, help="sequential round trips")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    args = parser.parse_args()

    from celery import Celery

    from producer.client import ActionClient
    from producer.config import Settings

    home = tempfile.mkdtemp(prefix="af-bench-")
    env = {"ACTIONFLEET_HOME": home}
    stat = {
        "primitive": "files",
        "tenant_id": "bench",
        "agent_id": "bench",
        "payload": {"op": "stat", "path": "hello.txt"},
    }
    write = stat | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
    rows: list[tuple[str, float]] = []
    lat: dict[str, list[float]] = {}
    mem: list[str] = []
    with redis_server() as url:
        noop = Celery(set_as_current=False, broker=url, backend=url)
        client = ActionClient(url, settings=Settings(broker_url=url))
        n = args.n

        def noop_all() -> list:
            return [noop.send_task("bench.noop", queue="bench") for _ in range(n)]

        def stat_all() -> list:
            return client.submit_many([dict(stat) for _ in range(n)])

        with celery_worker("benchmarks.noop_app", "bench", url, args.concurrency):
            lat["bare Celery no-op"] = timed(
                lambda: noop.send_task("bench.noop", queue="bench").get(timeout=30),
                args.latency_n,
            )
            rows.append(
                ("bare Celery no-op, 1 worker", throughput(noop_all, lambda h: h.get(timeout=120)))
            )
        with ExitStack() as stack:
            name = stack.enter_context(
                celery_worker("workers.app", "actions.files", url, args.concurrency, **env)
            )
            assert client.run(write, timeout=60).status == "succeeded"
            lat["fleet files stat"] = timed(lambda: client.run(stat, timeout=30), args.latency_n)
            one = throughput(stat_all, lambda h: h.result(timeout=300))
            rows.append(("fleet files stat, 1 worker", one))
            main_pid = WORKER_PIDS[name]
            mem.append(f"worker main process {rss_mb(main_pid):.0f} MB")
            for i, child in enumerate(children(main_pid)):
                mem.append(f"pool process {i} {rss_mb(child):.0f} MB")
            stack.enter_context(
                celery_worker(
                    "workers.app", "actions.files", url, args.concurrency, tag="-b", **env
                )
            )
            rows.append(
                (
                    "fleet files stat, 2 workers",
                    throughput(stat_all, lambda h: h.result(timeout=300)),
                )
            )
        client.close()
        noop.close()

    base = rows[0][1]
    print(f"{'subject':<32} {'actions/s':>10} {'ratio':>7}")
    for name, rate in rows:
        print(f"{name:<32} {rate:>10.1f} {rate / base:>7.2f}")
    print(f"(throughput ratios against: {rows[0][0]}; n={args.n}, concurrency={args.concurrency})")
    b50 = pct(lat["bare Celery no-op"], 0.5)
    for name, samples in lat.items():
        print(
            f"latency {name:<24} p50 {pct(samples, 0.5):7.2f} ms  p90 {pct(samples, 0.9):7.2f} ms"
            f"  p50/bare {pct(samples, 0.5) / b50:5.2f}"
        )
    print(f"scale-out: 2 workers / 1 worker = {rows[2][1] / rows[1][1]:.2f}")
    print("resident memory: " + ", ".join(mem))


if __name__ == "__main__":
    main()
