"""Throughput of trivial api actions (GET to a loopback server) through the whole fleet
(client -> Redis -> worker pipeline with policy, egress guard, audit -> result), beside
bare Celery no-op tasks on the same broker with the same worker count, in the same run.

    .venv/bin/python benchmarks/api_throughput.py [-n 1000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _common import ROOT, celery_worker, redis_server  # noqa: F401

POLICY = """version: 1
tenants:
  bench:
    egress: {allow_cidrs: ["127.0.0.0/8"], any_port: true}
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="actions per subject (1000)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes (2)")
    args = parser.parse_args()

    from celery import Celery, group

    from producer.client import ActionClient
    from workers.config import Settings

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{httpd.server_address[1]}/ping"
    policy = Path(tempfile.mkdtemp()) / "policy.yaml"
    policy.write_text(POLICY)
    home = Path(tempfile.mkdtemp())

    rows: list[tuple[str, float, float]] = []
    with redis_server() as url:
        with celery_worker("benchmarks.noop_app", "bench", url, concurrency=args.concurrency):
            app = Celery(set_as_current=False, broker=url, backend=url)
            sig = app.signature("bench.noop", queue="bench")
            group(sig.clone() for _ in range(20)).apply_async().get(timeout=60)  # warm-up
            t = time.perf_counter()
            group(sig.clone() for _ in range(args.n)).apply_async().get(timeout=600)
            took = time.perf_counter() - t
            rows.append(("bare Celery no-op task", took, _rate(args.n, took)))
            app.close()

        with celery_worker(
            "workers.app",
            "actions.api",
            url,
            concurrency=args.concurrency,
            ACTIONFLEET_POLICY=str(policy),
            ACTIONFLEET_HOME=str(home),
        ):
            client = ActionClient(url, settings=Settings(broker_url=url, home=home))

            def action() -> dict[str, Any]:
                return {
                    "primitive": "api",
                    "tenant_id": "bench",
                    "agent_id": "bench",
                    "payload": {"method": "GET", "url": target},
                }

            warm = [h.result(timeout=60) for h in client.submit_many([action()] * 20)]
            assert all(r.ok for r in warm), warm[0].model_dump_json()
            t = time.perf_counter()
            handles = client.submit_many([action() for _ in range(args.n)])
            results = [h.result(timeout=600) for h in handles]
            took = time.perf_counter() - t
            failed = [r for r in results if not r.ok]
            assert not failed, json.dumps(failed[0].model_dump(mode="json"))[:500]
            rows.append(("api GET action through the fleet", took, _rate(args.n, took)))
            client.close()
    httpd.shutdown()

    base = rows[0][2]
    print(f"{args.n} tasks per subject, {args.concurrency} worker processes, one Redis")
    print(f"{'subject':<34} {'seconds':>9} {'per s':>9} {'vs base':>9}")
    for name, took, rate in rows:
        print(f"{name:<34} {took:>9.2f} {rate:>9.1f} {rate / base:>9.2f}")
    print("(ratio: throughput against the bare Celery no-op task)")


if __name__ == "__main__":
    main()
