"""Authentication overhead: trivial actions (files `stat`, as in fleet_overhead.py) signed
by a producer key and verified by a worker with ``ACTIONFLEET_AUTH=required``, against
the same actions unsigned on a worker with ``ACTIONFLEET_AUTH=off``, in the same run.

    .venv/bin/python benchmarks/auth_overhead.py [-n 2000] [--concurrency 2] [--repeat 5]

Each worker has its own Redis database (so its own queue); the two are measured in
alternating pairs, drain (the workers' own capacity) and closed loop (client included:
signing costs the producer too), and each ratio is the median of the per-pair ratios.
Beside the wall-clock rates it prints the workers' own CPU time per drained action (from
/proc, the worker processes only): on a shared machine a neighbour's burst moves the rates,
much less the CPU an action costs, so that ratio is the steadier reading of the same cost.
Target (issue 20): verification adds at most 5 % to a trivial action, i.e. a signed/
unsigned drain ratio of at least 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from _common import WORKER_PIDS, celery_worker, redis_server, tree_cpu_s
from fleet_overhead import POLICY, STAT, closed_loop, drain, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="actions per throughput run")
    parser.add_argument("--concurrency", type=int, default=2, help="processes per worker")
    parser.add_argument("--repeat", type=int, default=5, help="unsigned/signed pairs")
    args = parser.parse_args()

    import redis
    from celery import Celery

    from producer.client import ActionClient
    from workers.auth.keys import KeyStore
    from workers.config import Settings

    home = tempfile.mkdtemp(prefix="af-bench-")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {"ACTIONFLEET_HOME": home, "ACTIONFLEET_POLICY": str(policy)}
    write = STAT | {"payload": {"op": "write", "path": "hello.txt", "content": "hi"}}
    n, c = args.n, args.concurrency

    def ok(h: object) -> None:
        result = h.result(timeout=300)  # type: ignore[attr-defined]
        assert result.status == "succeeded", result

    with redis_server() as url0:
        url1 = url0.rsplit("/", 1)[0] + "/1"
        r0, r1 = redis.Redis.from_url(url0), redis.Redis.from_url(url1)
        _, key = KeyStore(r1).create("bench", "*", ["files"])
        unsigned = ActionClient(url0, settings=Settings(broker_url=url0), key=None)
        unsigned.key = None
        signed = ActionClient(url1, settings=Settings(broker_url=url1), key=key)
        app0 = Celery(set_as_current=False, broker=url0)
        app1 = Celery(set_as_current=False, broker=url1)

        def unsigned_all() -> list:
            return unsigned.submit_many([dict(STAT) for _ in range(n)])

        def signed_all() -> list:
            return signed.submit_many([dict(STAT) for _ in range(n)])

        with (
            celery_worker(
                "workers.app", "actions.files", url0, c, tag="-off", ACTIONFLEET_AUTH="off", **env
            ) as off,
            celery_worker(
                "workers.app", "actions.files", url1, c, tag="-on", ACTIONFLEET_AUTH="required",
                **env,
            ) as on,
        ):  # fmt: skip
            assert unsigned.run(write, timeout=60).status == "succeeded"
            assert signed.run(write, timeout=60).status == "succeeded"
            cpu: dict[str, list[float]] = {"off": [], "on": []}

            def measured(node: str, label: str, run: Callable[[], float]) -> float:
                before = tree_cpu_s(WORKER_PIDS[node])
                rate = run()
                cpu[label].append((tree_cpu_s(WORKER_PIDS[node]) - before) / n * 1000)
                return rate

            rows = [
                (
                    "drain",
                    *paired(
                        args.repeat,
                        lambda: measured(
                            off,
                            "off",
                            lambda: drain(app0, r0, "actions.files", [off], True, unsigned_all, ok),
                        ),
                        lambda: measured(
                            on,
                            "on",
                            lambda: drain(app1, r1, "actions.files", [on], True, signed_all, ok),
                        ),
                    ),
                ),
                (
                    "closed loop",
                    *paired(
                        args.repeat,
                        lambda: closed_loop(unsigned_all, ok),
                        lambda: closed_loop(signed_all, ok),
                    ),
                ),
            ]
        for client in (unsigned, signed):
            client.close()

    print(f"auth overhead: {n} files stat actions per run, concurrency {c}, {args.repeat} pairs")
    print(f"{'mode':<12} {'unsigned/s':>11} {'signed/s':>9} {'signed/unsigned':>16}  per pair")
    for label, bases, subjects, ratios in rows:
        print(
            f"{label:<12} {statistics.median(bases):>11.0f} {statistics.median(subjects):>9.0f}"
            f" {statistics.median(ratios):>16.3f}  " + " ".join(f"{x:.3f}" for x in ratios)
        )
    per_pair = [a / b for a, b in zip(cpu["off"], cpu["on"], strict=True)]
    print(
        f"{'worker CPU':<12} {statistics.median(cpu['off']):>9.3f}ms"
        f" {statistics.median(cpu['on']):>7.3f}ms"
        f" {statistics.median(per_pair):>16.3f}  "
        + " ".join(f"{x:.3f}" for x in per_pair)
        + "   (CPU per action; ratio unsigned/signed)"
    )
    print("target: drain ratio >= 0.95 (verification adds at most 5 % to a trivial action)")


if __name__ == "__main__":
    main()
