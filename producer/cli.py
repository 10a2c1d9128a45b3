"""``actionfleet``: the command line. Run ``actionfleet --help``.

This module holds the agent's commands (``submit``, ``batch``, ``schema``), which need the
producer alone. The operator's commands (``up``, ``worker``, ``audit``, ...) live on the
worker side and join the parser through the ``actionfleet.commands`` entry points (see
pyproject.toml); this package never imports them. ``python -m workers.ops.cli`` is the
whole CLI without entry points (a source checkout, the fleet image).

Exit codes: 0 success; 1 an action ended with another status, or a command failed;
2 invalid input (nothing was sent).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from producer.batch import local_result
from producer.batch_cli import add_batch_parser
from producer.cli_io import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint
from producer.errors import ActionFleetError, InvalidAction, ResultTimeout
from producer.workflow_cli import add_workflow_parser

__all__ = ["AGENT_COMMANDS", "PLUGIN_GROUP", "Registrar", "build_parser", "main"]

# Commands served by this module alone: running one never loads a plugin.
AGENT_COMMANDS = frozenset({"submit", "batch", "schema", "tools", "workflow"})
# Entry-point group through which the worker side adds its commands.
PLUGIN_GROUP = "actionfleet.commands"
# Adds subcommands to the ``actionfleet`` parser's subparsers.
Registrar = Callable[[Any], None]


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def _invalid_result(exc: InvalidAction, raw: Any) -> dict[str, Any]:
    return local_result(raw, "invalid", "validation_error", str(exc), errors=exc.errors)


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


def cmd_tools(args: argparse.Namespace) -> int:
    from producer.tools import definitions

    print(json.dumps(definitions(args.format), indent=2))
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
            result = client.submit(action).result(timeout=args.timeout, final=args.final)
        except ResultTimeout as exc:
            _eprint(f"error: {exc}")
            return EXIT_FAILED
    print(result.model_dump_json(indent=2 if args.pretty else None))
    return EXIT_OK if result.ok else EXIT_FAILED


# ------------------------------------------------------------------------------ parser


def build_parser(registrars: Sequence[Registrar] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actionfleet",
        description="ActionFleet: sandboxed, policy-checked actions for AI agents over Celery.",
        epilog="Configuration: ACTIONFLEET_* environment variables (see README). "
        "Exit codes: 0 ok, 1 failed, 2 invalid input.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "submit",
        help="send one action and print its result JSON",
        description="Exit 0: succeeded; 1: any other status; 2: invalid input (nothing sent).",
    )
    p.add_argument("action", help="action JSON, '-' for stdin, or @FILE")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")
    p.add_argument("--pretty", action="store_true", help="indent the result JSON")
    p.add_argument(
        "--final",
        action="store_true",
        help="an action a rule parks for approval: wait for the decided result instead of "
        "printing awaiting_approval at once",
    )
    p.set_defaults(func=cmd_submit)

    add_batch_parser(sub)
    add_workflow_parser(sub)

    p = sub.add_parser("schema", help="print the JSON Schema of the action message")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "tools",
        help="print tool definitions of the five primitives for a model API",
        description="run_code, browse, files, send_email, call_api: their arguments are the "
        "primitives' payloads (the same schema as `actionfleet schema`). Turn a model's "
        "call into an action with producer.tools.action_for (docs/mcp.md).",
    )
    p.add_argument("--format", choices=("openai", "anthropic", "mcp"), default="mcp")
    p.set_defaults(func=cmd_tools)

    for register in registrars:
        register(sub)
    return parser


def discovered_registrars() -> list[Registrar]:
    """The registrars installed under ``actionfleet.commands`` (the worker side's)."""
    from importlib.metadata import entry_points

    found: list[Registrar] = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            found.append(ep.load())
        except ImportError as exc:  # a broken install must not take `submit` down with it
            _eprint(f"warning: commands of {ep.value} unavailable: {exc}")
    return found


def main(argv: list[str] | None = None, registrars: Sequence[Registrar] | None = None) -> int:
    """Run one command. ``registrars`` default to the installed entry points, skipped for
    the agent's own commands."""
    argv = sys.argv[1:] if argv is None else argv
    if registrars is None:
        agent_only = bool(argv) and argv[0] in AGENT_COMMANDS
        registrars = [] if agent_only else discovered_registrars()
    args = build_parser(registrars).parse_args(argv)
    try:
        return int(args.func(args))
    except ActionFleetError as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except ModuleNotFoundError as exc:
        # An operator command on an agent-side install (no worker extras).
        _eprint(
            f"error: `actionfleet {args.command}` needs {exc.name!r}, which this install"
            " lacks: pip install 'actionfleet[all]' (the agent side has submit, batch, schema)"
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
