"""Browse throughput: pages/s of a simple extraction (title + text of a loopback page)
through the real BrowseExecutor (egress proxy included), with ONE shared Chromium and a
fresh context per action, beside the same executor launching a browser per action, in
the same run.

    .venv/bin/python benchmarks/browse_throughput.py [-n 30] [--launch-n 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _common import ROOT, table, timed  # noqa: F401

PAGE = (
    "<!doctype html><html><head><title>Bench</title></head><body><main><h1>Benchmark page"
    "</h1><p>" + "Some words to extract. " * 200 + "</p></main></body></html>"
)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="timed actions, shared browser (30)")
    parser.add_argument("--launch-n", type=int, default=8, help="timed actions, browser each")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    from producer.models import action_adapter
    from workers.executors.browse import BrowseExecutor
    from workers.middleware import ActionContext
    from workers.outbound.secrets import build_secret_store
    from workers.policy import Grant, TenantPolicy
    from workers.workspace.tenant import Workspaces

    tmp = Path(tempfile.mkdtemp(prefix="browse-bench-"))
    (tmp / "site").mkdir()
    (tmp / "site" / "index.html").write_text(PAGE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(tmp / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    grant = Grant(
        tenant=TenantPolicy.model_validate(
            {"egress": {"allow_cidrs": ["127.0.0.0/8"], "any_port": True}}
        )
    )
    action = action_adapter.validate_python(
        {
            "primitive": "browse",
            "tenant_id": "bench",
            "agent_id": "bench",
            "payload": {"url": url, "extract": ["title", "text"]},
        }
    )

    def make() -> BrowseExecutor:
        return BrowseExecutor(
            executable=Path(args.chromium),
            workspaces=Workspaces(tmp / "ws"),
            secrets=build_secret_store(None),
        )

    def once(executor: BrowseExecutor) -> None:
        ctx = ActionContext(primitive="browse", queue="b", worker="b", attempt=1, raw={})
        out = executor.execute(action, grant, ctx)
        assert out["title"] == "Bench" and "Some words" in out["text"], out

    def launch_per_action() -> None:
        executor = make()
        try:
            once(executor)
        finally:
            executor.close()

    shared = make()
    try:
        rows = [
            ("browser per action (baseline)", timed(launch_per_action, args.launch_n, warmup=1)),
            ("shared browser, fresh context", timed(lambda: once(shared), args.n, warmup=2)),
        ]
    finally:
        shared.close()
        server.shutdown()
    print(table(rows, "browser per action (baseline)"))
    rates = {name: 1000 / statistics.fmean(s) for name, s in rows}
    base = rates["browser per action (baseline)"]
    print()
    for name, rate in rates.items():
        print(f"{name:<34} {rate:6.2f} pages/s   x{rate / base:.2f} vs baseline")


if __name__ == "__main__":
    main()
