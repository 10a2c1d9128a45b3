"""Cost of one Prometheus scrape of the fleet exporter, beside a bare HTTP scrape of an
empty registry (the same prometheus_client server) in the same run, as the backlog grows.

The exporter reads Redis on every scrape (no cache, no state); this shows what that costs
with an empty fleet and with thousands of queued and hundreds of unacked actions.

    .venv/bin/python benchmarks/metrics_scrape.py [-n 200]
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from _common import redis_server, table, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="timed scrapes per subject (200)")
    args = parser.parse_args()

    import redis
    from prometheus_client import CollectorRegistry, start_http_server

    from producer.models import PRIMITIVES, queue_for
    from workers.ops.metrics import UNACKED_KEY, start_metrics_server

    def get(url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()

    rows: list[tuple[str, list[float]]] = []
    with redis_server() as url:
        empty, _ = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
        base_url = f"http://127.0.0.1:{empty.server_address[1]}/metrics"
        rows.append(("empty registry (baseline)", timed(lambda: get(base_url), args.n)))

        server = start_metrics_server(url, port=0)
        rows.append(("fleet exporter, empty fleet", timed(lambda: get(server.url), args.n)))

        r = redis.Redis.from_url(url)
        body = json.dumps({"body": "x" * 800, "properties": {}})
        for p in PRIMITIVES:  # kombu's shapes: a list per priority, the unacked hash
            q = queue_for(p)
            with r.pipeline() as pipe:
                for i in range(2000):
                    pipe.lpush(q if i % 2 else f"{q}\x06\x163", body)
                for i in range(100):
                    pipe.hset(UNACKED_KEY, f"{p}-{i}", json.dumps([{"body": "x"}, "", q]))
                pipe.execute()
        rows.append(("exporter, 10k queued + 500 unacked", timed(lambda: get(server.url), args.n)))
        server.stop()
        empty.shutdown()
    print(table(rows, "empty registry (baseline)"))


if __name__ == "__main__":
    main()
