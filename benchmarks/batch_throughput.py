"""Batch throughput: ``actionfleet batch`` against the fleet's own drain rate, same run.

    .venv/bin/python benchmarks/batch_throughput.py [-n 100000] [--small 10000]
        [--repeat 3] [--concurrency 2] [--pool prefork|solo] [--window 1000]

One redis-server and one files worker (``workers.app``, the whole pipeline, audit events
to the Redis stream), trivial actions (files ``stat``), unsigned (auth_overhead.py
measures signatures). Measured, in this order:

- ``--repeat`` pairs, back to back, of ``-n`` actions each (the issue's 100,000):
  baseline, the fleet's drain rate: the actions published by ``ActionClient.submit_many``
  while the worker's consumer is cancelled, then the consumer added back and the clock
  run until every message is acknowledged (the workers' own capacity, no client
  competing for the CPU); subject: ``actionfleet batch IN --out OUT`` as a subprocess
  with the same number of lines, wall clock from start to exit (starting Python,
  reading, validating, sending, waiting, writing, journaling: everything a user waits
  for). The ratio is the median of the per-pair ratios (a neighbour's burst on a shared
  machine hits one pair).
- one batch of ``--small`` lines: its peak RSS against the pairs' (VmHWM of the batch
  process), flat in the input size when the window bounds memory.

Each batch row also shows the rate the batch reported itself (from its first send to its
last result, without the ~0.4 s of starting Python and the client): on a small batch
that start is a visible part of the wall clock, on 100,000 actions it is not.

Targets: batch >= 90 % of the drain rate; peak RSS <= 200 MB at both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT, celery_worker, redis_server
from fleet_overhead import drain

STAT = {
    "primitive": "files",
    "tenant_id": "bench",
    "agent_id": "bench",
    "payload": {"op": "stat", "path": "hello.txt"},
}


def write_input(path: Path, n: int) -> Path:
    line = json.dumps(STAT) + "\n"
    with path.open("w") as fh:
        for _ in range(n):
            fh.write(line)
    return path


def peak_rss_mb(pid: int) -> float | None:
    """The process's resident-memory high-water mark (VmHWM: since its exec, unlike
    ``wait4``'s ru_maxrss, which counts the parent's pages it had between fork and exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class BatchRun:
    per_s: float  # wall clock, from starting the process to its exit
    inner_per_s: float  # as the batch reports it: its first send to its last result
    peak_rss_mb: float
    cpu_ms: float  # CPU (user + system) of the batch process per action


def run_batch(url: str, src: Path, out: Path, window: int) -> BatchRun:
    """One ``actionfleet batch`` process; its peak RSS is the last VmHWM read, every
    0.1 s until it exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {"ACTIONFLEET_BROKER_URL": url, "PYTHONPATH": str(ROOT)}
    err = out.with_suffix(".stderr")
    argv = [sys.executable, "-m", "producer.cli", "batch", str(src), "--out", str(out)]
    argv += ["--window", str(window), "--no-progress"]
    start, cpu0 = time.perf_counter(), _children_cpu_s()
    peak = 0.0
    with err.open("w") as fh:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh)
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.1)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu_s() - cpu0  # the batch process is the only child reaped meanwhile
    lines = err.read_text().splitlines()
    summary = json.loads(next(ln for ln in lines if ln.startswith("summary: "))[9:])
    assert proc.returncode == 0 and summary["succeeded"] == summary["total"], lines[-3:]
    total = summary["total"]
    return BatchRun(total / elapsed, summary["per_s"], peak, cpu / total * 1000)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="actions per drain/batch pair")
    parser.add_argument("--small", type=int, default=10_000, help="actions in the small batch")
    parser.add_argument("--repeat", type=int, default=3, help="drain/batch pairs")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--pool", choices=("prefork", "solo"), default="prefork")
    parser.add_argument("--window", type=int, default=1000, help="batch --window")
    args = parser.parse_args()

    import redis

    from audit.config import STREAM
    from producer.client import ActionClient
    from workers.config import Settings

    home = Path(tempfile.mkdtemp(prefix="af-batch-bench-"))
    env = {"ACTIONFLEET_HOME": str(home), "ACTIONFLEET_WORKSPACE_ROOT": str(home / "ws")}
    with redis_server() as url:
        r = redis.Redis.from_url(url)
        client = ActionClient(url, settings=Settings(broker_url=url), key=None)
        with celery_worker(
            "workers.app", "actions.files", url, args.concurrency, pool=args.pool, **env
        ) as worker:
            write = STAT | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
            assert client.run(write, timeout=60).status == "succeeded"

            def check(handle: object) -> None:
                assert handle.result(timeout=600).status == "succeeded"  # type: ignore[attr-defined]

            # The ratio: drain then batch of the same size, back to back, ``repeat`` times
            # (on a shared machine a neighbour's burst then hits one pair, not one side).
            pairs: list[tuple[float, BatchRun]] = []
            src = write_input(home / f"in-{args.n}.jsonl", args.n)
            for i in range(args.repeat):
                print(f"pair {i + 1}: drain of {args.n} ...", file=sys.stderr)
                drained = drain(
                    client._app,
                    r,
                    "actions.files",
                    [worker],
                    True,
                    lambda: client.submit_many([dict(STAT) for _ in range(args.n)]),
                    check,
                )
                r.delete(STREAM)  # the audit events: nobody ingests them here
                print(f"pair {i + 1}: batch of {args.n} ...", file=sys.stderr)
                pairs.append((drained, run_batch(url, src, home / f"pair-{i}.jsonl", args.window)))
                r.delete(STREAM)

            print(f"batch: {args.small} actions ...", file=sys.stderr)
            src = write_input(home / f"in-{args.small}.jsonl", args.small)
            small = run_batch(url, src, home / f"out-{args.small}.jsonl", args.window)
            r.delete(STREAM)
        client.close()

    print(f"\nfiles stat, worker pool {args.pool} x{args.concurrency}, window {args.window}")
    print(f"pairs of {args.n}: drain/s (submit_many, then consume) vs batch/s (wall)")
    head = f"{'drain/s':>10} {'batch/s':>10} {'ratio':>6} {'batch own/s':>12}"
    print(f"{head} {'CPU ms/a':>9} {'peak RSS MB':>12}")
    for drained, run in pairs:
        print(
            f"{drained:>10.1f} {run.per_s:>10.1f} {run.per_s / drained:>6.2f} "
            f"{run.inner_per_s:>12.1f} {run.cpu_ms:>9.3f} {run.peak_rss_mb:>12.1f}"
        )
    ratios = sorted(run.per_s / drained for drained, run in pairs)
    print(f"median ratio batch/drain: {ratios[len(ratios) // 2]:.2f}")
    large = max(run.peak_rss_mb for _, run in pairs)
    print(
        f"peak RSS: {small.peak_rss_mb:.1f} MB at {args.small} actions "
        f"({small.per_s:.1f}/s wall, {small.inner_per_s:.1f}/s own), {large:.1f} MB at {args.n}"
    )
    print("targets: batch >= 0.90 x drain; peak RSS <= 200 MB, flat in n")


if __name__ == "__main__":
    main()
