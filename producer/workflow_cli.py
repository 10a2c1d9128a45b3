"""``actionfleet workflow run|status|cancel``: workflows the fleet runs (docs/workflows.md).

They talk to Redis with the producer's own credentials: ``run`` and ``cancel`` push a
signed message to ``actions.workflow``; ``status`` reads the workflow's result key,
which a producer's Redis user may read for its own tenant."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from producer.cli_io import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint
from producer.cli_io import print_json as _print
from producer.errors import ResultTimeout
from producer.workflows import (
    WorkflowHandle,
    cancel_workflow,
    load_workflow,
    submit_workflow,
)

__all__ = ["add_workflow_parser"]


def add_workflow_parser(sub: Any) -> None:
    p = sub.add_parser(
        "workflow",
        help="run, inspect and cancel workflows (chains of actions the fleet owns)",
        description="A workflow is a list of steps (actions) whose values may reference "
        'earlier steps ({"$ref": "steps.fetch.output.text"}), with conditions and '
        "compensations; the fleet keeps its state and resumes it after a crash "
        "(docs/workflows.md).",
    )
    wsub = p.add_subparsers(dest="workflow_command", required=True, metavar="SUBCOMMAND")
    run = wsub.add_parser(
        "run",
        help="send a workflow file (JSON or YAML) to the fleet",
        description="Prints {workflow_id, tenant_id, status}. With --wait, waits for the end "
        "and prints the final status; exit 0 only when it succeeded.",
    )
    run.add_argument("file", help="workflow JSON or YAML")
    run.add_argument("--tenant", default=None, help="override the file's tenant_id")
    run.add_argument("--agent", default=None, help="override the file's agent_id")
    run.add_argument("--wait", action="store_true", help="wait for the workflow to end")
    run.add_argument("--timeout", type=float, default=None, help="seconds --wait waits at most")
    run.set_defaults(func=cmd_workflow_run)
    status = wsub.add_parser("status", help="print a workflow's status JSON")
    status.add_argument("workflow_id")
    status.add_argument("--tenant", required=True, help="the workflow's tenant")
    status.set_defaults(func=cmd_workflow_status)
    cancel = wsub.add_parser(
        "cancel", help="stop a workflow; completed steps' compensations run, newest first"
    )
    cancel.add_argument("workflow_id")
    cancel.add_argument("--tenant", required=True, help="the workflow's tenant")
    cancel.set_defaults(func=cmd_workflow_cancel)


def cmd_workflow_run(args: argparse.Namespace) -> int:
    from producer.client import ActionClient

    try:
        spec = load_workflow(Path(args.file), tenant_id=args.tenant, agent_id=args.agent)
    except ValidationError as exc:
        for e in exc.errors():
            field = ".".join(str(x) for x in e["loc"]) or "workflow"
            _eprint(f"invalid: {field}: {e['msg']} -> fix the workflow file")
        return EXIT_INVALID
    except (OSError, ValueError) as exc:
        _eprint(f"invalid: {exc}")
        return EXIT_INVALID
    with ActionClient() as client:
        handle = submit_workflow(client, spec)
        if not args.wait:
            _print({"workflow_id": spec.workflow_id, "tenant_id": spec.tenant_id, "status": "sent"})
            return EXIT_OK
        try:
            final = handle.wait(args.timeout)
        except ResultTimeout as exc:
            _eprint(f"error: {exc}")
            return EXIT_FAILED
    _print(final)
    return EXIT_OK if final["status"] == "succeeded" else EXIT_FAILED


def cmd_workflow_status(args: argparse.Namespace) -> int:
    from producer.client import ActionClient

    with ActionClient() as client:
        status = WorkflowHandle(client, args.tenant, args.workflow_id).status()
    if status is None:
        _eprint(
            f"error: no workflow {args.workflow_id} of tenant {args.tenant} (not started yet, "
            "another tenant's, or expired)"
        )
        return EXIT_FAILED
    _print(status)
    return EXIT_OK


def cmd_workflow_cancel(args: argparse.Namespace) -> int:
    from producer.client import ActionClient

    with ActionClient() as client:
        cancel_workflow(client, args.tenant, args.workflow_id)
    _print({"workflow_id": args.workflow_id, "tenant_id": args.tenant, "cancel": "sent"})
    return EXIT_OK
