"""``actionfleet metrics`` and ``actionfleet flower``: the operations roles of the fleet image.

Registered by workers/ops/cli.py with one line. Imports stay inside the commands so the
producer-only install (no prometheus-client, no Flower) keeps a working CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from producer.cli_io import eprint as _eprint

__all__ = ["add_ops_parser"]


def _broker_url() -> str | None:
    from workers.config import get_settings

    return get_settings().resolved_broker_url()


def _cmd_metrics(args: argparse.Namespace) -> int:
    import redis

    from workers.config import get_settings
    from workers.ops.metrics import FleetCollector, start_metrics_server

    settings = get_settings()
    url = _broker_url()
    if not url:
        _eprint("error: no broker: set ACTIONFLEET_BROKER_URL or run `actionfleet up` first")
        return 1
    if args.metrics_cmd == "show":
        collector = FleetCollector(url, audit_stream=settings.audit_stream)
        try:
            print(json.dumps(collector.snapshot(), indent=2))
        except redis.RedisError as exc:
            _eprint(f"error: broker does not answer: {exc}")
            return 1
        finally:
            collector.close()
        return 0
    host = args.host or settings.metrics_host
    port = settings.metrics_port if args.port is None else args.port
    server = start_metrics_server(url, host=host, port=port, audit_stream=settings.audit_stream)
    _eprint(f"metrics: {server.url}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def _cmd_flower(args: argparse.Namespace) -> int:
    from workers.config import get_settings
    from workers.ops.flower import flower_argv, flower_auth, flower_env

    settings = get_settings()
    url = _broker_url()
    if not url:
        _eprint("error: no broker: set ACTIONFLEET_BROKER_URL or run `actionfleet up` first")
        return 1
    auth = flower_auth(settings)
    if auth.generated:
        _eprint(f"flower: user {auth.user!r}, generated password {auth.password!r}")
    host = args.host or settings.flower_host
    port = settings.flower_port if args.port is None else args.port
    argv = flower_argv(url, host, port or 5555)
    os.execve(sys.executable, argv, flower_env(dict(os.environ), auth))
    return 1  # pragma: no cover - execve does not return


def add_ops_parser(sub: Any) -> None:
    p = sub.add_parser("metrics", help="Prometheus metrics: queue depths, in flight, audit")
    msub = p.add_subparsers(dest="metrics_cmd", required=True, metavar="SUBCOMMAND")
    s = msub.add_parser("serve", help="serve /metrics until SIGTERM (the exporter role)")
    s.add_argument("--host", default=None, help="bind address (ACTIONFLEET_METRICS_HOST)")
    s.add_argument("--port", type=int, default=None, help="port (ACTIONFLEET_METRICS_PORT)")
    msub.add_parser("show", help="print the current numbers as JSON")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser("flower", help="run Flower with basic auth (the dashboard role)")
    p.add_argument("--host", default=None, help="bind address (ACTIONFLEET_FLOWER_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (ACTIONFLEET_FLOWER_PORT)")
    p.set_defaults(func=_cmd_flower)
