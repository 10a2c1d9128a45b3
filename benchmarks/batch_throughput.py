"""Batch throughput: ``actionfleet batch`` against the fleet's own drain rate, same run.

    .venv/bin/python benchmarks/batch_throughput.py [-n 100000] [--small 10000]
        [--concurrency 2] [--pool prefork|solo] [--window 1000]

One redis-server and one files worker (``workers.app``, the whole pipeline, audit events
to the Redis stream), trivial actions (files ``stat``). Measured, in this order:

- baseline, the fleet's drain rate: N actions published by ``ActionClient.submit_many``
  while the worker's consumer is cancelled, then the consumer added back and the clock
  run until every message is acknowledged (the workers' own capacity, no client
  competing for the CPU);
- subject: ``actionfleet batch IN --out OUT`` as a subprocess with the same N lines,
  wall clock from start to exit (reading, validating, signing off, sending, waiting,
  writing, journaling: everything a user waits for); and its peak RSS (``wait4``);
- the same batch with ``--small`` lines, for the RSS comparison (flat in the input size:
  the window bounds memory, not the input).

Target: batch actions/s >= 90 % of the drain rate; peak RSS <= 200 MB at both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_batch(url: str, src: Path, out: Path, window: int) -> tuple[float, float, dict]:
    """(actions/s, peak RSS in MB, summary) of one ``actionfleet batch`` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {"ACTIONFLEET_BROKER_URL": url, "PYTHONPATH": str(ROOT)}
    err = out.with_suffix(".stderr")
    argv = [sys.executable, "-m", "producer.cli", "batch", str(src), "--out", str(out)]
    argv += ["--window", str(window), "--no-progress"]
    start = time.perf_counter()
    with err.open("w") as fh:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = err.read_text().splitlines()
    summary = json.loads(next(ln for ln in lines if ln.startswith("summary: "))[9:])
    assert proc.returncode == 0 and summary["succeeded"] == summary["total"], lines[-3:]
    return summary["total"] / elapsed, usage.ru_maxrss / 1024, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="actions in the large batch")
    parser.add_argument("--small", type=int, default=10_000, help="actions in the small batch")
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

            def publish() -> list:
                return client.submit_many([dict(STAT) for _ in range(args.n)])

            def check(handle: object) -> None:
                assert handle.result(timeout=600).status == "succeeded"  # type: ignore[attr-defined]

            print(f"drain: {args.n} actions queued, then consumed ...", file=sys.stderr)
            drain_rate = drain(client._app, r, "actions.files", [worker], True, publish, check)
            r.delete(STREAM)  # the audit events of the drain: nobody ingests them here

            rows = []
            for n in (args.small, args.n):
                src = write_input(home / f"in-{n}.jsonl", n)
                print(f"batch: {n} actions ...", file=sys.stderr)
                rate, rss, summary = run_batch(url, src, home / f"out-{n}.jsonl", args.window)
                r.delete(STREAM)
                rows.append((n, rate, rss, summary["elapsed_s"]))
        client.close()

    print(f"\nfiles stat, worker pool {args.pool} x{args.concurrency}, window {args.window}")
    print(f"fleet drain (submit_many, then consume): {drain_rate:8.1f} actions/s  n={args.n}")
    print(f"{'batch n':>10} {'actions/s':>10} {'x drain':>8} {'peak RSS MB':>12} {'run s':>8}")
    for n, rate, rss, elapsed in rows:
        print(f"{n:>10} {rate:>10.1f} {rate / drain_rate:>8.2f} {rss:>12.1f} {elapsed:>8.1f}")
    print("targets: batch >= 0.90 x drain; peak RSS <= 200 MB, flat in n")


if __name__ == "__main__":
    main()
