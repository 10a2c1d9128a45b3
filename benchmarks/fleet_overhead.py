"""Fleet overhead: trivial actions (files `stat`) through the whole pipeline — validation,
policy, rate-limit and idempotency checks, audit emission — beside bare Celery no-op tasks
on the same broker, worker count and concurrency, in the same run. Also scale-out (two
worker processes vs one) and resident memory per worker process.

    .venv/bin/python benchmarks/fleet_overhead.py [-n 2000] [--concurrency 2] [--repeat 5]
        [--scale-repeat 9] [--pools prefork solo] [--placements floating pinned]

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
Baseline and subject runs alternate (``--repeat`` pairs, back to back), and each ratio
is the median of the per-pair ratios: on a shared machine a burst of someone else's load
then hits one pair instead of every run of one side.

Scale-out is measured with each pool and with two placements: ``floating`` (the
scheduler puts the workers where it likes) and ``pinned`` (worker i on CPU i, as
``actionfleet worker --cpus`` or a Kubernetes pod with exclusive cores runs it; bare
Celery through ``taskset``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    WORKER_PIDS,
    celery_worker,
    children,
    machine_busy_s,
    pct,
    redis_server,
    rss_mb,
    timed,
)

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


def backlog(r: object, keys: list[str]) -> int:
    """Messages still queued or delivered but not acknowledged."""
    pipe = r.pipeline(transaction=False)  # type: ignore[attr-defined]
    for key in keys:
        pipe.llen(key)
    pipe.hlen("unacked")
    return sum(pipe.execute())


def stays_empty(r: object, keys: list[str]) -> bool:
    """Two more empty looks, 1 ms apart: a message is briefly in neither the list nor the
    unacked hash (between a BRPOP and its bookkeeping), so one empty look is not enough."""
    for _ in range(2):
        time.sleep(0.001)
        if backlog(r, keys):
            return False
    return True


# Faster than any drain measured here (~1000/s): sleeping ``backlog / FASTEST`` never
# passes the end of a drain, and polls rarely while most of it is left -- on a 2-core
# machine a poller every 2 ms would take CPU from the workers it measures.
FASTEST_PER_S = 5000


def drain(
    app: object,
    r: object,
    queue: str,
    names: list[str],
    priorities: bool,
    publish: Callable[[], list],
    check: Callable[[object], None],
    cores: list[float] | None = None,
) -> float:
    """Actions/s of the workers ``names`` emptying a queue filled while they were idle;
    ``cores`` gets how many CPUs of the machine were busy meanwhile (anyone's work)."""
    control = app.control  # type: ignore[attr-defined]
    control.cancel_consumer(queue, destination=names, reply=True)
    handles = publish()
    keys = queue_keys(queue, priorities)
    busy = machine_busy_s()
    start = time.perf_counter()
    control.add_consumer(queue, destination=names, reply=True)
    while True:
        left = backlog(r, keys)
        if not left and stays_empty(r, keys):
            break
        time.sleep(min(0.05, max(0.002, left / FASTEST_PER_S)))
    elapsed = time.perf_counter() - start - 0.002  # stays_empty's two 1 ms looks
    if cores is not None:
        cores.append((machine_busy_s() - busy) / elapsed)
    for h in handles:  # outside the clock: every one finished, and as expected
        check(h)
    return len(handles) / elapsed


def closed_loop(publish: Callable[[], list], check: Callable[[object], None]) -> float:
    start = time.perf_counter()
    handles = publish()
    for h in handles:
        check(h)
    return len(handles) / (time.perf_counter() - start)


def paired(
    repeat: int, base: Callable[[], float], subject: Callable[[], float]
) -> tuple[list[float], list[float], list[float]]:
    """``repeat`` rounds of the baseline then the subject, back to back: a burst of load
    from a neighbour on a shared machine hits one pair, and the median of the per-pair
    ratios shrugs it off (measuring every baseline run before every subject run did not)."""
    bases, subjects = [], []
    for _ in range(repeat):
        bases.append(base())
        subjects.append(subject())
    return bases, subjects, [s / b for b, s in zip(bases, subjects, strict=True)]


def interleaved_latency(
    fns: dict[str, Callable[[], object]], n: int, rounds: int = 10
) -> dict[str, list[float]]:
    """Sequential round trips of each subject, ``n // rounds`` at a time, taking turns."""
    out: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            out[label] += timed(fn, max(1, n // rounds))
    return out


@dataclass
class Scale:
    """One scale-out measurement: throughput of 1 and 2 workers, per pair."""

    one: list[float] = field(default_factory=list)
    two: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cores1: list[float] = field(default_factory=list)  # CPUs busy during each drain
    cores2: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="actions per throughput run")
    parser.add_argument("--latency-n", type=int, default=300, help="sequential round trips")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    parser.add_argument("--repeat", type=int, default=5, help="baseline/subject pairs")
    parser.add_argument(
        "--scale-repeat", type=int, default=9, help="1-worker/2-worker pairs (noisier)"
    )
    parser.add_argument(
        "--pools",
        nargs="+",
        choices=("prefork", "solo"),
        default=["prefork", "solo"],
        help="Celery pools to measure scale-out with",
    )
    parser.add_argument(
        "--placements",
        nargs="+",
        choices=("floating", "pinned"),
        default=["floating", "pinned"],
        help="scale-out with workers left to the scheduler, and pinned one per CPU",
    )
    args = parser.parse_args()

    import redis
    from celery import Celery

    from producer.client import ActionClient
    from workers.config import Settings

    home = tempfile.mkdtemp(prefix="af-bench-")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {"ACTIONFLEET_HOME": home, "ACTIONFLEET_POLICY": str(policy)}
    write = STAT | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
    n, c, rep = args.n, args.concurrency, args.repeat
    rows: list[tuple[str, list[float], list[float], list[float]]] = []
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

        # Both workers run side by side, each on its own queue: a drain stops and restarts
        # only its own worker's consumer, and the other one waits on an empty queue.
        with (
            celery_worker("benchmarks.noop_app", "bench", url, c) as bare,
            celery_worker("workers.app", "actions.files", url, c, **env) as fleet,
        ):
            assert client.run(write, timeout=60).status == "succeeded"
            lat = interleaved_latency(
                {
                    "bare Celery no-op": lambda: noop.send_task("bench.noop", queue="bench").get(
                        timeout=30
                    ),
                    "fleet files stat": lambda: client.run(STAT, timeout=30),
                },
                args.latency_n,
            )
            rows.append(
                (
                    "drain",
                    *paired(
                        rep,
                        lambda: drain(noop, r, "bench", [bare], False, noop_all, noop_ok),
                        lambda: drain(noop, r, "actions.files", [fleet], True, stat_all, fleet_ok),
                    ),
                )
            )
            rows.append(
                (
                    "closed loop",
                    *paired(
                        rep,
                        lambda: closed_loop(noop_all, noop_ok),
                        lambda: closed_loop(stat_all, fleet_ok),
                    ),
                )
            )
            main_pid = WORKER_PIDS[fleet]
            mem.append(f"worker main process {rss_mb(main_pid):.0f} MB")
            for i, child in enumerate(children(main_pid)):
                mem.append(f"pool process {i} {rss_mb(child):.0f} MB")

        # Scale-out: one worker with one execution slot, then two of them, taking turns
        # (the second one's consumer is cancelled while the first drains alone); bare
        # Celery measured the same way shows what this machine allows. Both pools: with
        # prefork a worker is a consumer process plus one pool process, with solo it is
        # one process that runs the action itself.
        cpus = sorted(os.sched_getaffinity(0))

        def scale_out(
            app: str, queue: str, publish: Callable[[], list], check: Callable[[object], None],
            pool: str, pinned: bool,
        ) -> Scale:  # fmt: skip
            run = Scale()
            with ExitStack() as stack:
                names = [
                    stack.enter_context(
                        celery_worker(
                            app,
                            queue,
                            url,
                            1,
                            tag=f"-{pool}{'-pinned' if pinned else ''}{i}",
                            pool=pool,
                            cpus=str(cpus[i % len(cpus)]) if pinned else None,
                            **env,
                        )
                    )
                    for i in (0, 1)
                ]
                prio = queue == "actions.files"

                def one_worker() -> float:
                    noop.control.cancel_consumer(queue, destination=names[1:], reply=True)
                    return drain(noop, r, queue, names[:1], prio, publish, check, run.cores1)

                run.one, run.two, run.ratios = paired(
                    args.scale_repeat,
                    one_worker,
                    lambda: drain(noop, r, queue, names, prio, publish, check, run.cores2),
                )
                if pool == "solo" and app == "workers.app" and not pinned:
                    mem.append(f"solo worker process {rss_mb(WORKER_PIDS[names[0]]):.0f} MB")
                return run

        scale = {
            (pool, placement, label): scale_out(
                app, queue, publish, check, pool, placement == "pinned"
            )
            for placement in args.placements
            for pool in args.pools
            for label, app, queue, publish, check in (
                ("fleet files stat", "workers.app", "actions.files", stat_all, fleet_ok),
                ("bare Celery no-op", "benchmarks.noop_app", "bench", noop_all, noop_ok),
            )
        }
        client.close()
        noop.close()

    def spread(runs: list[float], fmt: str = ".0f") -> str:
        return " ".join(f"{x:{fmt}}" for x in runs)

    print(f"{'throughput':<12} {'bare Celery/s':>13} {'fleet/s':>9} {'ratio':>6}   pair ratios")
    for kind, bases, subjects, ratios in rows:
        print(
            f"{kind:<12} {statistics.median(bases):>13.1f} {statistics.median(subjects):>9.1f}"
            f" {statistics.median(ratios):>6.2f}   {' '.join(f'{x:.2f}' for x in ratios)}"
            f"   (bare {spread(bases)}; fleet {spread(subjects)})"
        )
    print(
        f"(n={n} per run, {rep} pairs, 1 worker each, concurrency={c}; ratio: median of the"
        " fleet/bare ratios of runs made back to back)"
    )
    b50 = pct(lat["bare Celery no-op"], 0.5)
    for label, samples in lat.items():
        print(
            f"latency {label:<24} p50 {pct(samples, 0.5):7.2f} ms  p90 {pct(samples, 0.9):7.2f} ms"
            f"  p50/bare {pct(samples, 0.5) / b50:5.2f}"
        )
    for (pool, placement, label), run in scale.items():
        c1, c2 = statistics.median(run.cores1), statistics.median(run.cores2)
        print(
            f"scale-out (drain, {pool}, {placement}, 1 slot per worker), {label}: 1 worker"
            f" {statistics.median(run.one):.1f}/s, 2 workers {statistics.median(run.two):.1f}/s,"
            f" x{statistics.median(run.ratios):.2f}   pairs {spread(run.ratios, '.2f')}"
        )
        # At equal CPU per action the ratio cannot pass the ratio of busy CPUs: a worker
        # that already keeps more than one core busy leaves less for a second one.
        print(
            f"    CPUs busy: 1 worker {c1:.2f}, 2 workers {c2:.2f} of {os.cpu_count()}"
            f" (x{c2 / c1:.2f} at equal CPU per action)"
        )
    print("resident memory: " + ", ".join(mem))


if __name__ == "__main__":
    main()
