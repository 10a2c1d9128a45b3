"""``actionfleet``: the command line. Run ``actionfleet --help``.

Exit codes: 0 success; 1 an action ended with another status, or a command failed;
2 invalid input (nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from producer.config import get_settings
from producer.errors import ActionFleetError, FleetUnavailable, InvalidAction, ResultTimeout

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
# Celery pools the worker is built and tested for (threads/gevent would share one
# pipeline between concurrent actions).
WORKER_POOLS = ("prefork", "solo")


def _eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def _local_result(
    raw: Any, status: str, error_type: str, message: str, **details: Any
) -> dict[str, Any]:
    """A result made on this side (invalid input, gave up waiting): same shape as a worker's."""
    action_id = raw.get("action_id") if isinstance(raw, dict) else None
    primitive = raw.get("primitive") if isinstance(raw, dict) else None
    return {
        "action_id": action_id if isinstance(action_id, str) else None,
        "primitive": primitive if isinstance(primitive, str) else None,
        "status": status,
        "output": None,
        "error": {
            "type": error_type,
            "message": message,
            "retryable": error_type != "validation_error",
            "details": details,
        },
        "attempt": 0,
        "started_at": None,
        "finished_at": None,
        "duration_ms": 0,
        "worker": None,
    }


def _invalid_result(exc: InvalidAction, raw: Any) -> dict[str, Any]:
    return _local_result(raw, "invalid", "validation_error", str(exc), errors=exc.errors)


def _read_action_arg(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    if arg.startswith("@"):
        return Path(arg[1:]).read_text()
    return arg


# ------------------------------------------------------------------------------ commands


def cmd_schema(args: argparse.Namespace) -> int:
    from producer.models import action_json_schema

    print(json.dumps(action_json_schema(), indent=2))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import ActionClient, validate_action

    text = _read_action_arg(args.action)
    try:
        raw: Any = json.loads(text)
    except ValueError:
        raw = text
    try:  # validate before touching the broker: bad input never needs a fleet
        action = validate_action(raw)
    except InvalidAction as exc:
        print(_dump(_invalid_result(exc, raw)))
        for e in exc.errors:
            _eprint(f"invalid: {e['field']}: {e['reason']} -> {e['fix']}")
        return EXIT_INVALID
    with ActionClient() as client:
        try:
            result = client.submit(action).result(timeout=args.timeout)
        except ResultTimeout as exc:
            _eprint(f"error: {exc}")
            return EXIT_FAILED
    print(result.model_dump_json(indent=2 if args.pretty else None))
    return EXIT_OK if result.ok else EXIT_FAILED


class Progress:
    """A one-line progress bar on stderr (plain periodic lines when not a terminal)."""

    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.counts: Counter[str] = Counter()
        self.start = time.monotonic()
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def update(self, status: str) -> None:
        self.done += 1
        self.counts[status] += 1
        now = time.monotonic()
        if self.done == self.total or now - self._last > (0.1 if self.tty else 2.0):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        filled = int(width * self.done / max(1, self.total))
        rate = self.done / max(1e-6, now - self.start)
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
        line += f"{rate:.1f}/s {counts}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def cmd_batch(args: argparse.Namespace) -> int:
    from producer.client import ActionClient

    lines = [ln for ln in Path(args.input).read_text().splitlines() if ln.strip()]
    try:
        client = ActionClient()
    except FleetUnavailable as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    slots: list[Any] = []  # per input line: a handle, or a ready result dict
    with client:
        for number, line in enumerate(lines, 1):
            try:
                raw: Any = json.loads(line)
            except ValueError:
                raw = line
            try:
                slots.append(client.submit(raw))
            except InvalidAction as exc:
                _eprint(f"line {number}: {exc}")
                slots.append(_invalid_result(exc, raw))
        progress = Progress(len(slots))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            for slot in slots:
                if isinstance(slot, dict):
                    result = slot
                else:
                    try:
                        result = slot.result(timeout=args.timeout).model_dump(mode="json")
                    except ResultTimeout as exc:  # the action may still run; say so
                        ident = {"action_id": slot.action_id, "primitive": slot.primitive}
                        result = _local_result(ident, "failed", "timeout", str(exc))
                fh.write(_dump(result) + "\n")
                progress.update(result["status"])
    elapsed = time.monotonic() - progress.start
    summary = {"total": len(slots), "elapsed_s": round(elapsed, 2), **dict(progress.counts)}
    _eprint("summary: " + _dump(summary))
    return EXIT_OK if progress.counts.get("succeeded", 0) == len(slots) else EXIT_FAILED


def cmd_up(args: argparse.Namespace) -> int:
    from workers.executors import EXECUTOR_FACTORIES
    from workers.fleet import Fleet

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
    from workers.fleet import fleet_status

    try:
        status = fleet_status(get_settings())
    except FleetUnavailable as exc:
        print(_dump({"broker": "down", "error": str(exc)}))
        return EXIT_FAILED
    print(json.dumps(status, indent=2, default=str))
    return EXIT_OK if status["workers"] else EXIT_FAILED


def cmd_down(args: argparse.Namespace) -> int:
    from workers.fleet import stop_fleet

    if stop_fleet(get_settings(), timeout=args.timeout):
        _eprint("fleet stopped")
        return EXIT_OK
    _eprint(f"no fleet running from {get_settings().home}")
    return EXIT_FAILED


def cmd_worker(args: argparse.Namespace) -> int:
    from producer.models import PRIMITIVES, queue_for

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in PRIMITIVES]
    if unknown:
        _eprint(f"error: unknown primitive(s) {unknown}; choose from {', '.join(PRIMITIVES)}")
        return EXIT_INVALID
    if args.pool == "solo" and (args.concurrency or 1) != 1:
        _eprint(
            f"error: --pool solo runs one action at a time (--concurrency 1); got"
            f" --concurrency {args.concurrency}: run more solo workers, or use --pool prefork"
        )
        return EXIT_INVALID
    long_running = [q for q in queues if q != "files"]
    if args.pool == "solo" and long_running:
        _eprint(
            f"warning: --pool solo with {', '.join(long_running)}: their actions wait seconds"
            " on a sandbox, browser or upstream, one at a time, and the worker answers pings"
            " only between actions; prefork suits them better (docs/operations.md)"
        )
    if args.cpus is not None:
        from workers.affinity import CpuSpecError, checked

        try:
            checked(args.cpus)
        except CpuSpecError as exc:
            _eprint(f"error: --cpus: {exc}")
            return EXIT_INVALID
        # The worker pins itself from the setting (workers/app.py), so a worker started
        # with plain `celery worker` and ACTIONFLEET_WORKER_CPUS behaves the same.
        os.environ["ACTIONFLEET_WORKER_CPUS"] = args.cpus
    from workers.fleet import celery_worker_argv

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
    from workers.demo import run_demo

    return run_demo(keep=args.keep)


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actionfleet",
        description="ActionFleet: sandboxed, policy-checked actions for AI agents over Celery.",
        epilog="Configuration: ACTIONFLEET_* environment variables (see README). "
        "Exit codes: 0 ok, 1 failed, 2 invalid input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser(
        "submit",
        help="send one action and print its result JSON",
        description="Exit 0: succeeded; 1: any other status; 2: invalid input (nothing sent).",
    )
    p.add_argument("action", help="action JSON, '-' for stdin, or @FILE")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")
    p.add_argument("--pretty", action="store_true", help="indent the result JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("batch", help="run a JSONL file of actions; results in input order")
    p.add_argument("input", help="JSONL file, one action per line")
    p.add_argument("--out", required=True, help="where to write one result per line")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait per result")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("demo", help="up, a sample batch, a summary, down")
    p.add_argument("--keep", action="store_true", help="leave the fleet running afterwards")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("schema", help="print the JSON Schema of the action message")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("worker", help="run a Celery worker for some primitives' queues")
    p.add_argument("--queues", default="code", help="comma-separated primitives (code)")
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

    from audit.cli import add_audit_parser

    add_audit_parser(sub)
    from workers.ops_cli import add_ops_parser

    add_ops_parser(sub)
    from workers.deadletter import add_dead_parser

    add_dead_parser(sub)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ActionFleetError as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
