"""The operator's commands: ``up``, ``status``, ``down``, ``demo``, ``worker``, ``sandbox``,
and (registered from their own modules) ``audit``, ``dead``, ``keys``, ``policy``,
``approvals``, ``metrics``, ``flower``.

``add_commands`` is the ``actionfleet.commands`` entry point through which they join the
``actionfleet`` parser of ``producer.cli``. ``python -m workers.ops.cli`` is the whole CLI
without entry points (a source checkout, the fleet image). Imports of what a command needs
stay inside it, so registering the commands costs nothing and works on any install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from audit.cli import add_audit_parser
from producer.cli import main as cli_main
from producer.cli_io import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint
from producer.errors import ActionFleetError, FleetUnavailable
from workers.config import get_settings
from workers.ops.dead import add_dead_parser
from workers.ops.governance_cli import add_governance_parsers
from workers.ops.keys import add_keys_parser
from workers.ops.roles import add_ops_parser

__all__ = ["WORKER_POOLS", "add_commands", "main"]

# Celery pools the worker is built and tested for (threads/gevent would share one
# pipeline between concurrent actions).
WORKER_POOLS = ("prefork", "solo")


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def cmd_up(args: argparse.Namespace) -> int:
    from workers.executors import EXECUTOR_FACTORIES
    from workers.ops.fleet import Fleet

    settings = get_settings()
    primitives = list(EXECUTOR_FACTORIES)
    if "code" in primitives and not args.no_image:
        from sandboxes.image import ensure_image

        try:
            tag = ensure_image(progress=lambda m: _eprint(f"sandbox image: {m}"))
        except ActionFleetError as exc:
            _eprint(f"error: {exc}")
            return EXIT_FAILED
        _eprint(f"sandbox image: {tag}")
    fleet = Fleet(settings, primitives, concurrency=args.concurrency, say=_eprint)
    fleet.flower = args.flower
    try:
        fleet.run_forever()
    except FleetUnavailable as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from workers.ops.fleet import fleet_status

    try:
        status = fleet_status(get_settings())
    except FleetUnavailable as exc:
        print(_dump({"broker": "down", "error": str(exc)}))
        return EXIT_FAILED
    print(json.dumps(status, indent=2, default=str))
    return EXIT_OK if status["workers"] else EXIT_FAILED


def cmd_down(args: argparse.Namespace) -> int:
    from workers.ops.fleet import stop_fleet

    if stop_fleet(get_settings(), timeout=args.timeout):
        _eprint("fleet stopped")
        return EXIT_OK
    _eprint(f"no fleet running from {get_settings().home}")
    return EXIT_FAILED


def cmd_worker(args: argparse.Namespace) -> int:
    from producer.models import PRIMITIVES, queue_for

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    known = (*PRIMITIVES, "workflow")  # workflow: the engine's queue, actions.workflow
    unknown = [q for q in queues if q not in known]
    if unknown:
        _eprint(f"error: unknown queue(s) {unknown}; choose from {', '.join(known)}")
        return EXIT_INVALID
    if args.pool == "solo" and (args.concurrency or 1) != 1:
        _eprint(
            f"error: --pool solo runs one action at a time (--concurrency 1); got"
            f" --concurrency {args.concurrency}: run more solo workers, or use --pool prefork"
        )
        return EXIT_INVALID
    long_running = [q for q in queues if q not in ("files", "workflow")]
    if args.pool == "solo" and long_running:
        _eprint(
            f"warning: --pool solo with {', '.join(long_running)}: their actions wait seconds"
            " on a sandbox, browser or upstream, one at a time, and the worker answers pings"
            " only between actions; prefork suits them better (docs/operations.md)"
        )
    if args.cpus is not None:
        from workers.celery.affinity import CpuSpecError, checked

        try:
            checked(args.cpus)
        except CpuSpecError as exc:
            _eprint(f"error: --cpus: {exc}")
            return EXIT_INVALID
        # The worker pins itself from the setting (workers/app.py), so a worker started
        # with plain `celery worker` and ACTIONFLEET_WORKER_CPUS behaves the same.
        os.environ["ACTIONFLEET_WORKER_CPUS"] = args.cpus
    from workers.ops.fleet import celery_worker_argv

    argv = celery_worker_argv(
        ",".join(queue_for(q) for q in queues),
        name=args.name,
        concurrency=args.concurrency,
        loglevel=args.loglevel,
        quiet=False,
        pool=None if args.pool == "prefork" else args.pool,
    )
    os.execv(sys.executable, argv)
    return EXIT_FAILED  # pragma: no cover - execv does not return


def cmd_sandbox(args: argparse.Namespace) -> int:
    if args.sandbox_cmd == "build":
        from sandboxes.image import build_image

        tag = build_image(force=args.force, progress=lambda m: _eprint(f"sandbox image: {m}"))
        print(tag)
        return EXIT_OK
    from sandboxes import open_backend

    sandbox = open_backend(get_settings())
    try:
        removed = sandbox.reap_all() if args.all else sandbox.reap()
    finally:
        sandbox.close()
    print(_dump({"removed": removed}))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.ops.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_mcp(args: argparse.Namespace) -> int:
    import redis

    from audit.config import audit_settings
    from producer.auth import ProducerKey
    from workers.auth.keys import KeyStore
    from workers.gateway.identity import Caller
    from workers.gateway.run import run_http, run_stdio
    from workers.gateway.server import Gateway

    settings = get_settings()

    def trace(action_id: str) -> list[dict[str, Any]]:
        from audit.reports import trace as audit_trace
        from audit.store import open_reader

        reader = open_reader(audit_settings(settings).dsn)
        try:
            return audit_trace(reader, action_id)
        finally:
            reader.close()

    if args.http:
        host, _, port = args.http.rpartition(":")
        url = settings.resolved_admin_url()
        if not url or not port.isdigit():
            _eprint(
                "error: --http HOST:PORT, and a fleet Redis (ACTIONFLEET_ADMIN_URL) to check keys"
            )
            return EXIT_INVALID
        store = KeyStore(redis.Redis.from_url(url, socket_timeout=10))
        _eprint(f"mcp: streamable HTTP on http://{host}:{port}/mcp (bearer producer keys)")
        run_http(Gateway(key_store=store, trace=trace), host or "127.0.0.1", int(port))
        return EXIT_OK
    secret = settings.resolved_key()
    if not secret or not args.tenant or not args.agent:
        _eprint(
            "error: over stdio the server acts for one key and agent: set ACTIONFLEET_KEY and "
            "pass --tenant and --agent (the fleet checks the key covers them)"
        )
        return EXIT_INVALID
    caller = Caller(args.tenant, args.agent, ProducerKey.parse(secret))
    run_stdio(Gateway(stdio_caller=caller, trace=trace))
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Register the operator's commands on the ``actionfleet`` subparsers."""
    p = sub.add_parser("up", help="run a local fleet in the foreground until Ctrl-C")
    p.add_argument("--concurrency", type=int, default=2, help="processes per worker (2)")
    p.add_argument("--no-image", action="store_true", help="do not build the sandbox image")
    p.add_argument("--flower", action="store_true", help="also run Flower (basic auth)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="print the fleet's status as JSON; exit 0 if it answers")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("down", help="stop the fleet started by `up` in this home")
    p.add_argument("--timeout", type=float, default=90, help="seconds to wait (90)")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("demo", help="up, a sample batch, a summary, down")
    p.add_argument("--keep", action="store_true", help="leave the fleet running afterwards")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("worker", help="run a Celery worker for some primitives' queues")
    p.add_argument(
        "--queues",
        default="code",
        help="comma-separated primitives, and `workflow` for the workflow engine (code)",
    )
    p.add_argument("--concurrency", type=int, default=None, help="pool processes (prefork)")
    p.add_argument(
        "--pool",
        choices=WORKER_POOLS,
        default="prefork",
        help="prefork (default): actions run in pool processes, one hard-killable process"
        " each; solo: one action at a time in the worker process itself, ~40%% less CPU"
        " per trivial action, scale by running more workers (docs/operations.md)",
    )
    p.add_argument(
        "--cpus",
        default=None,
        metavar="LIST",
        help="pin the worker to these CPUs (0, 0-3, 0,2; default: float on all); with"
        " at least as many CPUs as pool processes, each process gets one of them. Workers"
        " pinned one per core scale out better than floating ones (docs/operations.md)",
    )
    p.add_argument("--name", default=None, help="Celery node name, e.g. code1@%%h")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sandbox", help="build the sandbox image; reap leftover containers")
    ssub = p.add_subparsers(dest="sandbox_cmd", required=True, metavar="SUBCOMMAND")
    b = ssub.add_parser("build", help="build the sandbox image without a registry")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    r = ssub.add_parser(
        "reap",
        help="remove sandbox containers left by dead workers",
        description="Remove sandbox containers left by dead workers or past their expiry. "
        "With the runc backend, also delete the templates of images the engine no longer has "
        "that no process uses.",
    )
    r.add_argument("--all", action="store_true", help="remove every ActionFleet sandbox")
    p.set_defaults(func=cmd_sandbox)
    p = sub.add_parser(
        "mcp",
        help="an MCP server: the five primitives as tools (stdio, or --http HOST:PORT)",
        description="Over stdio (a desktop agent starts it) it acts for ACTIONFLEET_KEY as "
        "--tenant/--agent. Over HTTP each client sends its own producer key as a bearer "
        "token (docs/mcp.md). Tools run through the fleet; the server runs nothing itself.",
    )
    p.add_argument("--http", default=None, metavar="HOST:PORT", help="serve streamable HTTP")
    p.add_argument("--tenant", default=None, help="stdio: the tenant to act for")
    p.add_argument("--agent", default=None, help="stdio: the agent id to act as")
    p.set_defaults(func=cmd_mcp)

    add_audit_parser(sub)
    add_dead_parser(sub)
    add_keys_parser(sub)
    add_governance_parsers(sub)
    add_ops_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """The whole ``actionfleet`` CLI: the agent's commands and these."""
    return cli_main(argv, registrars=[add_commands])


if __name__ == "__main__":
    sys.exit(main())
