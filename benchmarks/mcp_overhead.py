"""MCP overhead: a trivial files action as an MCP ``tools/call`` over streamable HTTP
(``actionfleet mcp --http``), against the same action through ``ActionClient.run``, in the
same run, on the same fleet (one files worker requiring signed actions).

    .venv/bin/python benchmarks/mcp_overhead.py [-n 300] [--concurrency 8] [--rounds 3]

Latency: sequential round trips, the two subjects taking turns in rounds; p50 and p90.
Throughput: ``--concurrency`` calls in flight (MCP: one client session each over HTTP;
ActionClient: one thread each), actions/s. Targets (issue 21): MCP p50 <= 1.5x the
client's, MCP throughput >= 70 % of the client's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, celery_worker, pct, redis_server, tree_cpu_s

POLICY = """
version: 1
default:
  limits:
    rate: {files: {per_second: 100000, burst: 100000}}
    agent_rate: {per_second: 100000, burst: 100000}
"""
STAT = {"op": "stat", "path": "hello.txt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="calls per subject and measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each subject")
    args = parser.parse_args()

    import httpx
    import httpx2
    import redis
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    from producer.client import ActionClient
    from producer.tools import action_for
    from workers.auth.keys import KeyStore
    from workers.config import Settings
    from workers.ops.fleet import free_port

    home = tempfile.mkdtemp(prefix="af-bench-")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {
        "ACTIONFLEET_HOME": home,
        "ACTIONFLEET_POLICY": str(policy),
        "ACTIONFLEET_AUTH": "required",
        "ACTIONFLEET_WORKSPACE_ROOT": str(Path(home) / "ws"),
    }
    with redis_server() as url:
        _, key = KeyStore(redis.Redis.from_url(url)).create("bench", "bench", ["files"])
        client = ActionClient(url, settings=Settings(broker_url=url), key=key)
        write = action_for(
            "files", {"op": "write", "path": "hello.txt", "content": "hi"},
            tenant_id="bench", agent_id="bench",
        )  # fmt: skip
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}/mcp"
        server_env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")} | {
            "ACTIONFLEET_BROKER_URL": url,
            "ACTIONFLEET_ADMIN_URL": url,
            "PYTHONPATH": str(ROOT),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "mcp", "--http", f"127.0.0.1:{port}"],
            env=server_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            with celery_worker("workers.app", "actions.files", url, 2, **env):
                assert client.run(write, timeout=60).status == "succeeded"
                for _ in range(100):
                    try:
                        httpx.post(endpoint, json={}, timeout=2)
                        break
                    except httpx.TransportError:
                        time.sleep(0.1)

                def direct() -> None:
                    action = action_for("files", STAT, tenant_id="bench", agent_id="bench")
                    assert client.run(action, timeout=60).status == "succeeded"

                async def mcp_session(
                    calls: int, lat: list[float], pings: list[float] | None = None
                ) -> None:
                    headers = {"Authorization": f"Bearer {key.secret()}"}
                    async with (
                        httpx2.AsyncClient(headers=headers, timeout=60) as http,
                        streamable_http_client(endpoint, http_client=http) as (read, write_),
                        ClientSession(read, write_) as s,
                    ):
                        await s.initialize()
                        for _ in range(calls if pings is not None else 0):
                            t = time.perf_counter()
                            await s.send_ping()
                            pings.append(time.perf_counter() - t)  # type: ignore[union-attr]
                        for _ in range(calls):
                            t = time.perf_counter()
                            r = await s.call_tool("files", STAT)
                            lat.append(time.perf_counter() - t)
                            assert not r.is_error, r

                lat_direct: list[float] = []
                lat_mcp: list[float] = []
                lat_ping: list[float] = []  # the SDK's own floor: a ping, no action
                # CPU seconds of this process (the caller) and of the MCP server, per subject.
                cpu = {"direct": [0.0, 0.0], "mcp": [0.0, 0.0]}
                per_round = max(1, args.n // args.rounds)
                for _ in range(args.rounds):
                    c0 = time.process_time()
                    for _ in range(per_round):
                        t = time.perf_counter()
                        direct()
                        lat_direct.append(time.perf_counter() - t)
                    cpu["direct"][0] += time.process_time() - c0
                    asyncio.run(mcp_session(per_round, [], lat_ping))
                    c0, s0 = time.process_time(), tree_cpu_s(server.pid)
                    asyncio.run(mcp_session(per_round, lat_mcp))
                    cpu["mcp"][0] += time.process_time() - c0
                    cpu["mcp"][1] += tree_cpu_s(server.pid) - s0

                c = args.concurrency
                t = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    list(pool.map(lambda _: direct(), range(args.n)))
                rate_direct = args.n / (time.perf_counter() - t)

                async def many() -> None:
                    sink: list[float] = []
                    await asyncio.gather(*(mcp_session(args.n // c, sink) for _ in range(c)))

                t = time.perf_counter()
                asyncio.run(many())
                rate_mcp = (args.n // c) * c / (time.perf_counter() - t)
        finally:
            server.terminate()
            server.wait(15)
            client.close()

    p50d, p50m = statistics.median(lat_direct) * 1000, statistics.median(lat_mcp) * 1000
    print(f"mcp overhead: files stat, {args.n} calls per measurement, {args.rounds} rounds")
    print(f"{'subject':<26} {'p50 ms':>7} {'p90 ms':>7} {'actions/s (c=' + str(c) + ')':>18}")
    print(f"{'ActionClient.run':<26} {p50d:>7.1f} {pct(lat_direct, 0.9) * 1000:>7.1f} "
          f"{rate_direct:>18.0f}")  # fmt: skip
    print(f"{'MCP tools/call (HTTP)':<26} {p50m:>7.1f} {pct(lat_mcp, 0.9) * 1000:>7.1f} "
          f"{rate_mcp:>18.0f}")  # fmt: skip
    print(f"{'MCP ping (HTTP, no action)':<26} {statistics.median(lat_ping) * 1000:>7.1f} "
          f"{pct(lat_ping, 0.9) * 1000:>7.1f}")  # fmt: skip
    calls = per_round * args.rounds
    for name, (mine, served) in cpu.items():
        print(f"CPU ms/call, {name}: caller {mine / calls * 1000:.2f}, "
              f"MCP server {served / calls * 1000:.2f}")  # fmt: skip
    print(f"ratios: p50 {p50m / p50d:.2f}x (target <= 1.5), throughput "
          f"{rate_mcp / rate_direct:.2f} (target >= 0.70)")  # fmt: skip


if __name__ == "__main__":
    main()
