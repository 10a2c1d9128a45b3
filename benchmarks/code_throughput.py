"""Sustained throughput of `print(1)` code actions through the fleet with the warm pool,
against the same worker with a cold container per action (pool size 0), in the same run;
then the resident memory of 8 idle pooled python containers, from each one's cgroup.

    .venv/bin/python benchmarks/code_throughput.py [-n 200] [--concurrency 2]

Target of the pool (issue #8): >= 3x actions/s; 8 idle warm containers < 150 MB in total.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, celery_worker, pct, redis_server  # noqa: F401

ACTION = {
    "primitive": "code",
    "tenant_id": "bench",
    "agent_id": "bench",
    "payload": {"language": "python", "source": "print(1)"},
}


def throughput(url: str, n: int, concurrency: int, pool_size: int) -> tuple[float, list[float]]:
    """(actions/s over n back-to-back actions, per-action ms) with `concurrency` in flight."""
    from producer.client import ActionClient
    from producer.config import Settings

    with celery_worker(
        "workers.app",
        "actions.code",
        url,
        concurrency=concurrency,
        ACTIONFLEET_SANDBOX_POOL_SIZE=str(pool_size),
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
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            samples = list(ex.map(one, range(n)))
        rate = n / (time.perf_counter() - started)
        client.close()
    return rate, samples


def _cgroup_usage(client: object, container_id: str) -> tuple[int, int]:
    """(usage bytes, usage minus inactive page cache) of one container's memory cgroup."""
    v1 = Path(f"/sys/fs/cgroup/memory/docker/{container_id}")
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope")
    for base, usage_file, inactive_key in (
        (v1, "memory.usage_in_bytes", "total_inactive_file"),
        (v2, "memory.current", "inactive_file"),
    ):
        if (base / usage_file).exists():
            usage = int((base / usage_file).read_text())
            stats = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
            return usage, usage - int(stats.get(inactive_key, 0))
    stats = client.api.stats(container_id, stream=False)["memory_stats"]  # type: ignore[attr-defined]
    inactive = stats.get("stats", {}).get("total_inactive_file", 0)
    return stats["usage"], stats["usage"] - inactive


def idle_pool_memory(count: int = 8) -> tuple[int, int]:
    """Summed cgroup memory of `count` idle warm containers of the default profile."""
    from sandboxes.base import Limits, RunSpec
    from sandboxes.docker import DockerSandbox
    from sandboxes.pool import PooledDockerSandbox

    limits = Limits(timeout_s=10, memory_mb=128, pids=64)
    pool = PooledDockerSandbox(DockerSandbox(), max_per_profile=count, prewarm=(limits,))
    try:
        # Demand of `count` concurrent runs sizes the pool to `count` (peak + 1, capped).
        with ThreadPoolExecutor(count) as ex:
            spec = RunSpec(language="python", source="pass", limits=limits)
            list(ex.map(lambda _: pool.run(spec), range(count)))
        assert pool.settle(120), "the pool did not settle"
        time.sleep(2.0)  # idle: let the runners reach their blocking read
        ids = pool.warm_ids()
        assert len(ids) == count, ids
        usages = [_cgroup_usage(pool.cold._client, cid) for cid in ids]
    finally:
        pool.close()
    return sum(u for u, _ in usages), sum(w for _, w in usages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="timed actions per subject (200)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (2)")
    args = parser.parse_args()

    rows = []
    with redis_server() as url:
        for label, size in (("cold container per action", 0), ("warm pool (size 4)", 4)):
            rate, samples = throughput(url, args.n, args.concurrency, size)
            rows.append((label, rate, samples))
    base = rows[0][1]
    print(f"{'subject':<28} {'n':>5} {'actions/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'x base':>7}")
    for label, rate, samples in rows:
        print(
            f"{label:<28} {len(samples):>5} {rate:>10.1f} {pct(samples, 0.5):>8.1f} "
            f"{pct(samples, 0.9):>8.1f} {rate / base:>7.2f}"
        )
    print(f"(concurrency {args.concurrency}; ratios against: {rows[0][0]})")
    usage, working = idle_pool_memory(8)
    print(
        f"8 idle warm containers: cgroup usage {usage / 2**20:.1f} MB in total, "
        f"{working / 2**20:.1f} MB without inactive page cache"
    )


if __name__ == "__main__":
    main()
