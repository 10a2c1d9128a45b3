"""Sustained throughput of `print(1)` code actions through the fleet with the warm pool,
against the same worker with a cold container per action (pool size 0), in the same run,
for each sandbox backend (docker: through the engine; runc: runc driven directly); then
the resident memory of 8 idle pooled python containers, from each one's cgroup.

    sudo .venv/bin/python benchmarks/code_throughput.py [-n 200] [--concurrency 2]
        [--backends docker runc]

Ratios are printed against the Docker backend's cold path (the fleet's baseline: one
fresh container through the engine per action) and against each backend's own cold path.

Per subject it also prints the CPU the whole machine spent per action and how busy its
CPUs were (``/proc/stat``: on a shared host other users are included), the throughput
that CPU cost allows on this host's cores, and how many sandbox containers the engine
created during the timed run by the pool and on the cold path (a live event stream).
Where the cores are saturated, the ratio is bounded by the ratio of CPU per action, not by
when the containers are made: see ``engine_capacity.py`` for what a container costs.

Target of the pool (issue #8): >= 3x actions/s; 8 idle warm containers < 150 MB in total.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _common import (  # noqa: F401
    ROOT,
    add_backends_option,
    celery_worker,
    machine_busy_s,
    pct,
    redis_server,
)

ACTION = {
    "primitive": "code",
    "tenant_id": "bench",
    "agent_id": "bench",
    "payload": {"language": "python", "source": "print(1)"},
}


@dataclass
class Subject:
    label: str
    rate: float  # actions/s
    samples: list[float]  # ms per action
    cpu_ms: float  # CPU-ms of the whole machine per action (all processes, all CPUs)
    busy: float  # share of all CPUs busy during the timed run
    pooled: int  # containers the warm pool created during the timed run
    cold: int  # containers created on the cold path during the timed run


class CreateCounter:
    """Counts sandbox containers the engine creates while it runs, pooled vs cold, from a
    live event stream (the engine keeps only its last 256 events, so asking afterwards
    misses most of a run)."""

    def __init__(self) -> None:
        import docker

        self._engine = docker.from_env()
        self._stream = self._engine.events(
            filters={"type": "container", "event": "create", "label": "actionfleet.sandbox=1"},
            decode=True,
        )
        self.pooled = self.cold = 0
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends with an error on close()
            for event in self._stream:
                attributes = event.get("Actor", {}).get("Attributes", {})
                if attributes.get("actionfleet.pool") == "1":
                    self.pooled += 1
                else:
                    self.cold += 1

    def close(self) -> tuple[int, int]:
        time.sleep(0.5)  # events of the last creates are still on their way
        self._stream.close()
        self._thread.join(5)
        self._engine.close()
        return self.pooled, self.cold


def throughput(
    url: str, n: int, concurrency: int, pool_size: int, label: str, backend: str
) -> Subject:
    """n back-to-back actions with `concurrency` in flight: rate, latency, CPU per action."""
    from producer.client import ActionClient
    from workers.config import Settings

    with celery_worker(
        "workers.app",
        "actions.code",
        url,
        concurrency=concurrency,
        ACTIONFLEET_SANDBOX_POOL_SIZE=str(pool_size),
        ACTIONFLEET_SANDBOX_BACKEND=backend,
    ):
        client = ActionClient(url, settings=Settings(broker_url=url))

        def one(_: int) -> float:
            t = time.perf_counter()
            result = client.run(ACTION, timeout=120)
            assert result.status == "succeeded" and result.output["stdout"] == "1\n", result
            return (time.perf_counter() - t) * 1000

        with ThreadPoolExecutor(concurrency) as ex:  # warm-up: executors built, pools primed
            list(ex.map(one, range(concurrency * 3)))
        time.sleep(1.0)
        counter = CreateCounter()
        busy = machine_busy_s()
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            samples = list(ex.map(one, range(n)))
        seconds = time.perf_counter() - started
        busy = machine_busy_s() - busy
        pooled, cold = counter.close()
        client.close()
    cores = os.cpu_count() or 1
    return Subject(
        label, n / seconds, samples, 1000 * busy / n, busy / seconds / cores, pooled, cold
    )


def _cgroup_usage(backend: str, container_id: str) -> tuple[int, int]:
    """(usage bytes, usage minus inactive page cache) of one container's memory cgroup."""
    from sandboxes.runc import CGROUP_PARENT

    parent = "docker" if backend == "docker" else CGROUP_PARENT
    v1 = Path(f"/sys/fs/cgroup/memory/{parent}/{container_id}")
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope")
    v2_runc = Path(f"/sys/fs/cgroup/{CGROUP_PARENT}/{container_id}")
    for base, usage_file, inactive_key in (
        (v1, "memory.usage_in_bytes", "total_inactive_file"),
        (v2, "memory.current", "inactive_file"),
        (v2_runc, "memory.current", "inactive_file"),
    ):
        if (base / usage_file).exists():
            usage = int((base / usage_file).read_text())
            stats = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
            return usage, usage - int(stats.get(inactive_key, 0))
    raise SystemExit(f"no memory cgroup found for container {container_id}")


def idle_pool_memory(backend: str, count: int = 8) -> tuple[int, int]:
    """Summed cgroup memory of `count` idle warm containers of the default profile."""
    from sandboxes import open_backend
    from sandboxes.base import Limits, RunSpec
    from sandboxes.pool import PooledSandbox
    from workers.config import Settings

    limits = Limits(timeout_s=10, memory_mb=128, pids=64)
    sandbox = open_backend(Settings(sandbox_backend=backend))  # type: ignore[arg-type]
    pool = PooledSandbox(sandbox, max_per_profile=count, prewarm=(limits,))
    try:
        # Demand of `count` concurrent runs sizes the pool to `count` (peak + 1, capped).
        with ThreadPoolExecutor(count) as ex:
            spec = RunSpec(language="python", source="pass", limits=limits)
            list(ex.map(lambda _: pool.run(spec), range(count)))
        assert pool.settle(120), "the pool did not settle"
        time.sleep(2.0)  # idle: let the runners reach their blocking read
        ids = pool.warm_ids()
        assert len(ids) == count, ids
        usages = [_cgroup_usage(backend, cid) for cid in ids]
    finally:
        pool.close()
    return sum(u for u, _ in usages), sum(w for _, w in usages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="timed actions per subject (200)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (2)")
    add_backends_option(parser)
    args = parser.parse_args()

    rows: list[tuple[str, Subject]] = []
    with redis_server() as url:
        for backend in args.backends:
            for label, size in (("cold container per action", 0), ("warm pool (size 4)", 4)):
                subject = throughput(url, args.n, args.concurrency, size, label, backend)
                rows.append((backend, subject))
    base = rows[0][1]
    own_cold = {backend: row.rate for backend, row in rows if row.label.startswith("cold")}
    print(
        f"{'backend':<7} {'subject':<26} {'n':>5} {'actions/s':>10} {'p50 ms':>8} {'p90 ms':>8}"
        f" {'x base':>7} {'x own cold':>10} {'CPU-ms/action':>14} {'CPU busy':>9}"
        f" {'pooled':>7} {'cold':>5}"
    )
    for backend, row in rows:
        counts = f"{row.pooled:>7} {row.cold:>5}" if backend == "docker" else f"{'-':>7} {'-':>5}"
        print(
            f"{backend:<7} {row.label:<26} {len(row.samples):>5} {row.rate:>10.1f} "
            f"{pct(row.samples, 0.5):>8.1f} {pct(row.samples, 0.9):>8.1f} "
            f"{row.rate / base.rate:>7.2f} {row.rate / own_cold[backend]:>10.2f} "
            f"{row.cpu_ms:>14.0f} {row.busy:>9.0%} {counts}"
        )
    cores = os.cpu_count() or 1
    print(
        f"(concurrency {args.concurrency}; x base: against {rows[0][0]} {base.label}; x own "
        "cold: against the same backend's cold path; CPU-ms/action: every CPU of the "
        "machine, other users included; pooled/cold: containers the engine created during "
        "the timed run, by the pool or on the cold path, docker backend only)"
    )
    for backend, row in rows:
        bound = 1000 * cores / row.cpu_ms
        print(
            f"{backend} {row.label}: at {row.cpu_ms:.0f} CPU-ms per action, {cores} cores "
            f"bound it to {bound:.1f} actions/s ({bound / base.rate:.2f}x the base rate)"
        )
    for backend in args.backends:
        usage, working = idle_pool_memory(backend, 8)
        print(
            f"{backend}: 8 idle warm containers: cgroup usage {usage / 2**20:.1f} MB in total, "
            f"{working / 2**20:.1f} MB without inactive page cache"
        )


if __name__ == "__main__":
    main()
