"""Batch throughput: ``actionfleet batch`` against the fleet's own drain rate, same run.

    .venv/bin/python benchmarks/batch_throughput.py [-n 100000] [--small 10000]
        [--pair-n 10000] [--repeat 3] [--concurrency 2] [--pool prefork|solo] [--window 1000]

One redis-server and one files worker (``workers.app``, the whole pipeline, audit events
to the Redis stream), trivial actions (files ``stat``), unsigned (auth_overhead.py
measures signatures). Measured, in this order:

- ``--repeat`` pairs, back to back, of ``--pair-n`` actions each:
  baseline, the fleet's drain rate: the actions published by ``ActionClient.submit_many``
  while the worker's consumer is cancelled, then the consumer added back and the clock
  run until every message is acknowledged (the workers' own capacity, no client
  competing for the CPU); subject: ``actionfleet batch IN --out OUT`` as a subprocess
  with the same number of lines, wall clock from start to exit (reading, validating,
  sending, waiting, writing, journaling: everything a user waits for). The ratio is the
  median of the per-pair ratios (a neighbour's burst on a shared machine hits one pair).
- the batch with ``--small`` and with ``-n`` lines: actions/s and peak RSS (VmHWM of the
  batch process), flat in the input size when the window bounds memory.

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


def run_batch(url: str, src: Path, out: Path, window: int) -> tuple[float, float, dict, float]:
    """(actions/s, peak RSS in MB, summary, CPU ms per action) of one ``actionfleet
    batch`` process; the peak is the last VmHWM read, every 0.1 s until it exits."""
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
    return summary["total"] / elapsed, peak, summary, cpu / summary["total"] * 1000


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="actions in the large batch")
    parser.add_argument("--small", type=int, default=10_000, help="actions in the small batch")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument("--pool", choices=("prefork", "solo"), default="prefork")
    parser.add_argument("--window", type=int, default=1000, help="batch --window")
    parser.add_argument(
        "--pair-n", type=int, default=10_000, help="actions per drain/batch pair (ratio)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="drain/batch pairs")
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
            pairs = []
            src = write_input(home / f"in-{args.pair_n}.jsonl", args.pair_n)
            for i in range(args.repeat):
                print(f"pair {i + 1}: drain of {args.pair_n} ...", file=sys.stderr)
                drained = drain(
                    client._app,
                    r,
                    "actions.files",
                    [worker],
                    True,
                    lambda: client.submit_many([dict(STAT) for _ in range(args.pair_n)]),
                    check,
                )
                r.delete(STREAM)  # the audit events: nobody ingests them here
                print(f"pair {i + 1}: batch of {args.pair_n} ...", file=sys.stderr)
                rate, _, _, cpu = run_batch(url, src, home / f"pair-{i}.jsonl", args.window)
                r.delete(STREAM)
                pairs.append((drained, rate, cpu))

            rows = []
            for n in (args.small, args.n):
                src = write_input(home / f"in-{n}.jsonl", n)
                print(f"batch: {n} actions ...", file=sys.stderr)
                rate, rss, summary, cpu = run_batch(url, src, home / f"out-{n}.jsonl", args.window)
                r.delete(STREAM)
                rows.append((n, rate, rss, summary["elapsed_s"], cpu))
        client.close()

    print(f"\nfiles stat, worker pool {args.pool} x{args.concurrency}, window {args.window}")
    print(f"pairs of {args.pair_n}: drain/s (submit_many, then consume) vs batch/s (wall)")
    for drained, rate, cpu in pairs:
        print(
            f"  drain {drained:8.1f}   batch {rate:8.1f}   ratio {rate / drained:5.2f}"
            f"   batch CPU {cpu:.3f} ms/action"
        )
    ratios = sorted(rate / drained for drained, rate, _ in pairs)
    print(f"median ratio batch/drain: {ratios[len(ratios) // 2]:.2f}")
    print(f"{'batch n':>10} {'actions/s':>10} {'peak RSS MB':>12} {'run s':>8} {'CPU ms/a':>9}")
    for n, rate, rss, elapsed, cpu in rows:
        print(f"{n:>10} {rate:>10.1f} {rss:>12.1f} {elapsed:>8.1f} {cpu:>9.3f}")
    print("targets: batch >= 0.90 x drain; peak RSS <= 200 MB, flat in n")


if __name__ == "__main__":
    main()
