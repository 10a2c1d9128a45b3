"""``actionfleet policy check|validate`` and ``actionfleet approvals ...``.

``policy check`` runs the workers' own evaluator (``workers.policy.PolicyEngine``, the
object a worker builds from the same file) on one action and prints the decision and the
rules behind it; nothing is sent or run. ``policy validate`` loads a file the way a worker
does. ``approvals`` lists, shows and decides the actions rules parked (docs/policy.md).
Registered by workers/ops/cli.py; imports stay inside the commands.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from pathlib import Path
from typing import Any

from producer.cli_io import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint
from producer.cli_io import print_json as _print
from producer.errors import FleetUnavailable
from workers.config import get_settings

__all__ = ["EXIT_APPROVAL", "add_governance_parsers"]

EXIT_APPROVAL = 3  # policy check: the action would wait for a human's approval


def _read(arg: str) -> str:
    if arg == "-":
        return sys.stdin.read()
    if arg.startswith("@"):
        return Path(arg[1:]).read_text()
    return arg


# ----------------------------------------------------------------------------- policy


def _cmd_policy(args: argparse.Namespace) -> int:
    from workers.policy import PolicyEngine, load_policy

    if args.policy_cmd == "validate":
        try:
            policy = load_policy(Path(args.file))
        except ValueError as exc:
            _print({"valid": False, "file": args.file, "error": str(exc)})
            _eprint(f"invalid: {exc}")
            return EXIT_INVALID
        rules = policy.ruleset
        _print(
            {
                "valid": True,
                "file": args.file,
                "tenants": sorted(policy.tenants),
                "rules": [] if rules is None else [r.public() for r in rules.rules.values()],
                "groups": {} if policy.rules is None else policy.rules.groups,
            }
        )
        return EXIT_OK
    return _check(args, PolicyEngine)


def _check(args: argparse.Namespace, engine_cls: Any) -> int:
    from producer.errors import ActionError, InvalidAction
    from producer.validation import parse_action

    path = Path(args.policy) if args.policy else get_settings().policy
    try:
        engine = engine_cls(path)
    except ValueError as exc:
        _eprint(f"error: {exc}")
        return EXIT_INVALID
    text = _read(args.action)
    try:
        action = parse_action(json.loads(text))
    except (ValueError, InvalidAction) as exc:
        errors = getattr(exc, "errors", [{"field": "action", "reason": str(exc), "fix": ""}])
        _print({"decision": "invalid", "errors": errors})
        return EXIT_INVALID
    try:
        grant = engine.authorize(action)
    except ActionError as exc:
        out: dict[str, Any] = {"decision": "deny", "message": exc.message, **exc.details}
        if args.explain:
            rules = engine.current().ruleset
            out["explain"] = rules.decide(action).explain() if rules is not None else None
        _print(out)
        return EXIT_FAILED
    verdict = grant.verdict
    decision = "allow" if verdict is None else verdict.outcome
    out = {"decision": decision, "reason": grant.reason}
    if verdict is not None:
        out["rules"] = [r.id for r in verdict.rules]
        if args.explain:
            out["explain"] = verdict.explain()
    _print(out)
    return EXIT_APPROVAL if decision == "require_approval" else EXIT_OK


# -------------------------------------------------------------------------- approvals


def _redis() -> Any:
    import redis

    url = get_settings().resolved_admin_url()
    if not url:
        raise FleetUnavailable(
            "no fleet Redis configured: set ACTIONFLEET_ADMIN_URL (or ACTIONFLEET_BROKER_URL), "
            "or start a fleet with `actionfleet up` in this home"
        )
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def _sender(url: str) -> Any:
    """Publishes decided messages to their queues (a client Celery app of the fleet)."""
    from celery import Celery

    from producer.transport import celery_conf
    from workers.governance.approvals import send_message

    app = Celery("actionfleet-approvals", set_as_current=False)
    app.conf.update(celery_conf(get_settings(), url))
    return app, lambda message: send_message(app, message)


def _cmd_approvals(args: argparse.Namespace) -> int:
    from workers.governance.approvals import ApprovalStore
    from workers.governance.approvers import ApproverStore

    settings = get_settings()
    client = _redis()
    try:
        store = ApprovalStore(
            client,
            retention_s=settings.approval_retention_s,
            redispatch_s=settings.approval_redispatch_s,
        )
        if args.approvals_cmd == "approver":
            return _approver(args, ApproverStore(client))
        if args.approvals_cmd == "list":
            rows = store.list(None if args.status == "all" else args.status, args.limit)
            _print([r.public() for r in rows])
            return EXIT_OK
        if args.approvals_cmd == "show":
            record = store.get(args.id)
            if record is None:
                _eprint(f"error: no approval {args.id!r}: `actionfleet approvals list` shows them")
                return EXIT_FAILED
            _print(record.public(with_payload=True))
            return EXIT_OK
        if args.approvals_cmd == "serve":
            return _serve(args, store, ApproverStore(client))
        return _decide(args, store)
    finally:
        client.close()


def _decide(args: argparse.Namespace, store: Any) -> int:
    from workers.governance.approvals import decide_and_send

    if not args.reason.strip():
        _eprint("error: --reason: say why (it is audited with your name)")
        return EXIT_INVALID
    who = args.approver or f"cli:{getpass.getuser()}@{socket.gethostname()}"
    status = "approved" if args.approvals_cmd == "approve" else "denied"
    app, send = _sender(get_settings().resolved_admin_url() or "")
    try:
        decided = decide_and_send(store, send, args.id, status, who, args.reason.strip())
    finally:
        app.close()
    if decided.status == "missing":
        _eprint(f"error: no approval {args.id!r}: `actionfleet approvals list` shows them")
        return EXIT_FAILED
    if not decided.decided or decided.status != status:
        _eprint(f"error: approval {args.id} is already {decided.status} (by {decided.by})")
        _print({"id": args.id, "status": decided.status, "decided_by": decided.by})
        return EXIT_FAILED
    assert decided.record is not None
    _print(decided.record.public())
    return EXIT_OK


def _serve(args: argparse.Namespace, store: Any, approvers: Any) -> int:
    from workers.governance.http import ApprovalsServer, serve

    host, _, port = args.http.rpartition(":")
    if not port.isdigit():
        _eprint("error: --http HOST:PORT, e.g. 127.0.0.1:8790")
        return EXIT_INVALID
    app, send = _sender(get_settings().resolved_admin_url() or "")
    server = ApprovalsServer((host or "127.0.0.1", int(port)), store, approvers, send)
    _eprint(f"approvals: {server.url}/approvals (Bearer approver tokens)")
    try:
        serve(server)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return EXIT_OK


def _approver(args: argparse.Namespace, approvers: Any) -> int:
    if args.approver_cmd == "add":
        try:
            approver, token = approvers.add(args.name, args.tenants)
        except ValueError as exc:
            _eprint(f"error: {exc}")
            return EXIT_INVALID
        _print({"name": approver.name, "tenants": approver.tenants, "token": token})
        _eprint("the token is shown once, above; the fleet keeps only its hash")
        return EXIT_OK
    if args.approver_cmd == "list":
        _print([a.__dict__ for a in approvers.list()])
        return EXIT_OK
    removed = approvers.remove(args.name)
    _print({"name": args.name, "tokens_removed": removed})
    return EXIT_OK if removed else EXIT_FAILED


def add_governance_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="check an action against the policy, or validate a policy file",
        description="Rules are Cedar policies in the policy file's `rules` section "
        "(docs/policy.md). Exit codes of check: 0 allow, 1 deny, 2 invalid input, "
        "3 require_approval.",
    )
    psub = p.add_subparsers(dest="policy_cmd", required=True, metavar="SUBCOMMAND")
    c = psub.add_parser(
        "check",
        help="print the decision on an action and the rules behind it; nothing runs",
        description="The workers' own evaluator on one action: allow, deny or "
        "require_approval, the rules that decided, and with --explain what the rules saw "
        "(principal, action, resource, context). Exit 0 allow, 1 deny, 2 invalid, 3 approval.",
    )
    c.add_argument("action", help="action JSON, '-' for stdin, or @FILE")
    c.add_argument("--policy", default=None, help="policy file (default: ACTIONFLEET_POLICY)")
    c.add_argument("--explain", action="store_true", help="also print the rules and the request")
    v = psub.add_parser(
        "validate",
        help="load a policy file as a worker would: exit 0 valid, 2 invalid",
        description="Parses the YAML, every tenant's merge and the Cedar rules (type-checked "
        "against the fleet's schema) before you deploy it. A running worker keeps its last "
        "good policy when the file turns bad.",
    )
    v.add_argument("file")
    p.set_defaults(func=_cmd_policy)

    p = sub.add_parser(
        "approvals",
        help="actions waiting for a human: list, show, approve, deny, serve over HTTP",
        description='Rules with @outcome("approval") park actions until an approver decides '
        "or the approval times out (docs/policy.md). Decisions are audited with the approver "
        "and the reason.",
    )
    asub = p.add_subparsers(dest="approvals_cmd", required=True, metavar="SUBCOMMAND")
    lst = asub.add_parser("list", help="approvals, newest first (default: pending)")
    lst.add_argument(
        "--status", default="pending", choices=("pending", "approved", "denied", "expired", "all")
    )
    lst.add_argument("--limit", type=int, default=100)
    s = asub.add_parser("show", help="one approval, with the parked action's message")
    s.add_argument("id", help="the approval id (<tenant>+<action_id>)")
    for name, verb in (("approve", "run it (once)"), ("deny", "end it denied")):
        d = asub.add_parser(name, help=f"{name} a pending action: {verb}")
        d.add_argument("id", help="the approval id (<tenant>+<action_id>)")
        d.add_argument("--reason", required=True, help="why; audited with your name")
        d.add_argument("--as", dest="approver", default=None, help="approver name (cli:USER@HOST)")
    srv = asub.add_parser("serve", help="the approvers' HTTP endpoint (Bearer approver tokens)")
    srv.add_argument("--http", default="127.0.0.1:8790", metavar="HOST:PORT")
    ap = asub.add_parser("approver", help="approver tokens for the HTTP endpoint")
    apsub = ap.add_subparsers(dest="approver_cmd", required=True, metavar="SUBCOMMAND")
    add = apsub.add_parser("add", help="a token for NAME; printed once")
    add.add_argument("name")
    add.add_argument("--tenants", default="*", help="tenants they may decide for (pattern; *)")
    apsub.add_parser("list", help="approvers (never tokens)")
    rm = apsub.add_parser("remove", help="revoke every token of NAME")
    rm.add_argument("name")
    p.set_defaults(func=_cmd_approvals)
