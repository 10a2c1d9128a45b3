"""End-to-end latency of a `print(1)` code action through the fleet, with the warm
container pool and without it (a cold container per action), beside a cold `docker run` of
the same image and a bare Celery no-op round trip, in the same run.

Target of the pool (issue #8): pooled p50 <= 1/5 and p90 <= 1/3 of the cold `docker run`.
Each timed action is preceded by a short pause (--gap-ms) so the pool refills as it would
between an agent's steps; back-to-back load is what code_throughput.py measures.

    sudo .venv/bin/python benchmarks/code_latency.py [-n 30] [--runtime runc|runsc]
        [--gap-ms 300] [--backends docker runc]

The fleet subjects run once per sandbox backend (docker: through the engine; runc: runc
driven directly, runtime runc only, needs root).
"""

from __future__ import annotations

import argparse
import time

from _common import ROOT, add_backends_option, celery_worker, redis_server, table, timed  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="timed runs per subject (30)")
    parser.add_argument("--runtime", default="runc", choices=["runc", "runsc"])
    parser.add_argument("--gap-ms", type=float, default=300, help="pause between actions")
    add_backends_option(parser)
    args = parser.parse_args()
    if args.runtime == "runsc" and "runc" in args.backends:
        parser.error("the runc backend runs runc only: --backends docker with --runtime runsc")

    import docker
    from celery import Celery

    from producer.client import ActionClient
    from sandboxes.image import ensure_image
    from workers.config import Settings

    image = ensure_image()
    engine = docker.from_env()
    action = {
        "primitive": "code",
        "tenant_id": "bench",
        "agent_id": "bench",
        "payload": {"language": "python", "source": "print(1)"},
    }

    def cold_docker_run() -> None:
        out = engine.containers.run(
            image,
            entrypoint=["python3", "-c", "print(1)"],
            remove=True,
            network_mode="none",
            runtime=args.runtime,
        )
        assert out.strip() == b"1"

    rows: list[tuple[str, list[float]]] = []
    with redis_server() as url:
        with celery_worker("benchmarks.noop_app", "bench", url) as _:
            noop_app = Celery(set_as_current=False, broker=url, backend=url)
            rows.append(
                (
                    "bare Celery no-op round trip",
                    timed(
                        lambda: noop_app.send_task("bench.noop", queue="bench").get(timeout=30),
                        args.n * 3,
                    ),
                )
            )
            noop_app.close()
        rows.append((f"cold docker run ({args.runtime})", timed(cold_docker_run, args.n)))
        subjects = [
            (backend, label, pool_size)
            for backend in args.backends
            for label, pool_size in (("cold container", "0"), ("warm pool", "4"))
        ]
        for backend, label, pool_size in subjects:
            with celery_worker(
                "workers.app",
                "actions.code",
                url,
                concurrency=1,
                ACTIONFLEET_SANDBOX_BACKEND=backend,
                ACTIONFLEET_SANDBOX_RUNTIME=args.runtime,
                ACTIONFLEET_SANDBOX_POOL_SIZE=pool_size,
            ):
                client = ActionClient(url, settings=Settings(broker_url=url))
                samples: list[float] = []
                for i in range(args.n + 2):  # the first two are warm-up, not kept
                    time.sleep(args.gap_ms / 1000)  # untimed: the pool refills meanwhile
                    t = time.perf_counter()
                    result = client.run(action, timeout=60)
                    if i >= 2:
                        samples.append((time.perf_counter() - t) * 1000)
                    assert result.status == "succeeded" and result.output["stdout"] == "1\n"
                rows.append((f"fleet {backend} backend, {label} ({args.runtime})", samples))
                client.close()
    print(table(rows, baseline=f"cold docker run ({args.runtime})"))


if __name__ == "__main__":
    main()
