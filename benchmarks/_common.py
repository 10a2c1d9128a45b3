"""Helpers for benchmarks: percentiles, a table, real processes started and stopped."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


WORKER_PIDS: dict[str, int] = {}  # node name -> main process pid of running bench workers


def rss_mb(pid: int) -> float:
    """Resident memory of one process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU-seconds all CPUs spent running something since boot (user, nice, system, irq,
    softirq; not idle, iowait or steal: time the hypervisor gave to other guests)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(parts[:3]) + parts[5] + parts[6]) / CLK_TCK


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def tree_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system) used so far by a process and its live children: the
    work a worker did, whatever else the machine was running meanwhile."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    """Milliseconds per call of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def table(rows: list[tuple[str, list[float]]], baseline: str) -> str:
    base = {name: s for name, s in rows}[baseline]
    b50, b90 = pct(base, 0.5), pct(base, 0.9)
    width = max(34, *(len(name) for name, _ in rows))
    lines = [
        f"{'subject':<{width}} {'n':>4} {'p50 ms':>9} {'p90 ms':>9} {'mean':>9} "
        f"{'p50/base':>9} {'p90/base':>9}"
    ]
    for name, s in rows:
        lines.append(
            f"{name:<{width}} {len(s):>4} {pct(s, 0.5):>9.1f} {pct(s, 0.9):>9.1f} "
            f"{statistics.fmean(s):>9.1f} {pct(s, 0.5) / b50:>9.2f} {pct(s, 0.9) / b90:>9.2f}"
        )
    lines.append(f"(ratios against: {baseline})")
    return "\n".join(lines)


@contextmanager
def redis_server() -> Iterator[str]:
    from workers.ops.fleet import free_port, redis_argv

    port = free_port()
    proc = subprocess.Popen(redis_argv("redis-server", port), stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.RedisError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def celery_worker(
    app: str,
    queue: str,
    broker_url: str,
    concurrency: int = 1,
    tag: str = "",
    pool: str | None = None,
    cpus: str | None = None,
    **env_extra: str,
) -> Iterator[str]:
    from celery import Celery

    name = f"bench-{queue}-{os.getpid()}{tag}@localhost"
    # Unsigned actions unless a benchmark asks otherwise (auth_overhead.py measures auth).
    env = {
        **os.environ,
        "ACTIONFLEET_AUTH": "off",
        "ACTIONFLEET_BROKER_URL": broker_url,
        "PYTHONPATH": str(ROOT),
        **env_extra,
    }
    log = Path(tempfile.mkdtemp()) / "worker.log"
    from workers.ops.fleet import celery_worker_argv

    argv = celery_worker_argv(
        queue, app=app, name=name, concurrency=concurrency, loglevel="WARNING", pool=pool
    )
    if cpus is not None:
        if app == "workers.app":  # the fleet pins itself (`actionfleet worker --cpus`)
            env["ACTIONFLEET_WORKER_CPUS"] = cpus
        else:
            argv = ["taskset", "-c", cpus, *argv]
    proc = subprocess.Popen(
        [*argv, "--logfile", str(log)],
        env=env,
        cwd=ROOT,
    )
    probe = Celery(set_as_current=False, broker=broker_url)
    try:
        for _ in range(120):
            if probe.control.ping(destination=[name], timeout=0.5):
                break
        else:
            raise RuntimeError(f"worker {name} did not start; see {log}")
        WORKER_PIDS[name] = proc.pid
        yield name
    finally:
        WORKER_PIDS.pop(name, None)
        probe.close()
        proc.terminate()
        proc.wait(60)


def add_backends_option(parser: argparse.ArgumentParser) -> None:
    """``--backends``: the sandbox backends whose subjects a code benchmark measures."""
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("docker", "runc"),
        default=["docker", "runc"],
        help="sandbox backends to measure (default both; runc: root, runc on PATH, "
        "runtime runc only)",
    )
