"""``actionfleet audit …``: ingest, query, trace and report.

Register with ``add_audit_parser(subparsers)`` on the main parser. Every query command
prints JSON, one row per line (``--format json`` for one array), and works while the
fleet runs: a chDB store held by the running ingester is read through its loopback
query endpoint, otherwise the store is opened directly.

Exit codes: 0 ok; 1 the store or stream cannot be reached, or the query failed;
2 invalid input (a non-read statement, a bad month).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from audit.config import DEAD_STREAM, AuditSettings, audit_settings
from producer.cli_io import EXIT_FAILED, EXIT_INVALID, EXIT_OK
from producer.cli_io import eprint as _eprint

__all__ = ["add_audit_parser", "add_ingest_arguments", "cmd_audit", "ingester_from_args"]


def _settings(args: argparse.Namespace) -> AuditSettings:
    s = audit_settings()
    overrides: dict[str, Any] = {}
    if getattr(args, "dsn", None):
        overrides["clickhouse_dsn"] = args.dsn
    if getattr(args, "broker", None):
        overrides["broker_url"] = args.broker
    if overrides:
        from dataclasses import replace

        s = replace(s, **overrides)
    return s


def _print_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2, default=str))
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False, default=str))


# ----------------------------------------------------------------------------- ingest


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsn", help="chdb:///path or http(s)://host:8123 (default: settings)")
    p.add_argument("--broker", help="redis:// URL of the stream (default: the fleet's)")
    p.add_argument("--batch-size", type=int, default=None, help="flush at this many events")
    p.add_argument("--batch-age", type=float, default=None, help="or after this many seconds")
    p.add_argument(
        "--claim-idle",
        type=float,
        default=None,
        help="claim other ingesters' entries pending this long (s)",
    )
    p.add_argument("--retention-days", type=int, default=None, help="TTL of both tables")
    p.add_argument("--consumer", default=None, help="consumer name (default host:pid:rand)")
    p.add_argument("--no-serve", action="store_true", help="do not serve read-only queries")
    p.add_argument("--query-port", type=int, default=0, help="loopback port for queries (free)")
    p.add_argument("--pause-after-insert", type=float, default=0.0, help=argparse.SUPPRESS)


def ingester_from_args(args: argparse.Namespace) -> Any:
    from audit.ingester import Ingester

    s = _settings(args)
    if not s.broker_url:
        raise SystemExit("error: no broker: start a fleet (`actionfleet up`) or pass --broker")
    return Ingester(
        s.broker_url,
        s.dsn,
        stream=s.stream,
        consumer=args.consumer,
        batch_size=args.batch_size or s.batch_size,
        batch_age_s=args.batch_age if args.batch_age is not None else s.batch_age_s,
        claim_idle_s=args.claim_idle if args.claim_idle is not None else s.claim_idle_s,
        retention_days=args.retention_days or s.retention_days,
        serve_queries=not args.no_serve,
        query_port=args.query_port,
        pause_after_insert_s=args.pause_after_insert,
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ingester = ingester_from_args(args)
    signal.signal(signal.SIGTERM, ingester.stop)
    signal.signal(signal.SIGINT, ingester.stop)
    ingester.run_forever()
    return EXIT_OK


# ----------------------------------------------------------------------------- queries


def _with_reader(args: argparse.Namespace, fn: Callable[[Any], list[dict[str, Any]]]) -> int:
    from audit.store import QueryError, StoreUnavailable, open_reader

    try:
        reader = open_reader(_settings(args).dsn)
    except StoreUnavailable as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    try:
        rows = fn(reader)
    except QueryError as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except ValueError as exc:  # our own input checks: not a read statement, bad month
        _eprint(f"error: {exc}")
        return EXIT_INVALID
    except StoreUnavailable as exc:
        _eprint(f"error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # ClickHouse refused it: say why in one line, no traceback
        from audit.sql_errors import explain

        why = explain(exc)
        text = why.message if why else (str(exc).strip().splitlines() or [repr(exc)])[0]
        _eprint(f"error: {text[:500]}")
        return EXIT_FAILED
    finally:
        reader.close()
    _print_rows(rows, getattr(args, "format", "jsonl"))
    return EXIT_OK


def _params(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param wants NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def cmd_sql(args: argparse.Namespace) -> int:
    from audit.store import check_read_only

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    try:
        check_read_only(sql)
        params = _params(args.param)
    except ValueError as exc:
        _eprint(f"error: {exc}")
        return EXIT_INVALID
    return _with_reader(args, lambda r: r.query(sql, params or None).dicts())


def cmd_trace(args: argparse.Namespace) -> int:
    from audit import reports

    def run(reader: Any) -> list[dict[str, Any]]:
        rows = reports.trace(reader, args.action_id)
        if not rows:
            _eprint(f"no audit events for action {args.action_id} (yet?)")
        return rows

    return _with_reader(args, run)


def cmd_report(args: argparse.Namespace) -> int:
    from audit import reports

    if args.report == "tenant":
        return _with_reader(args, lambda r: reports.tenant(r, args.tenant_id, args.days, args.user))
    if args.report == "usage":
        if args.month is not None and not reports.MONTH.match(args.month):
            _eprint(f"error: --month must look like 2026-11, not {args.month!r}")
            return EXIT_INVALID
        return _with_reader(args, lambda r: reports.usage(r, args.month))
    return _with_reader(args, lambda r: reports.denials(r, args.days, args.tenant))


def cmd_status(args: argparse.Namespace) -> int:
    """Backlog and health of the audit path, as one JSON object."""
    import redis

    from audit.store import endpoint_file

    s = _settings(args)
    out: dict[str, Any] = {"dsn": s.dsn, "stream": s.stream}
    ep = endpoint_file(s.dsn)
    out["query_endpoint"] = str(ep) if ep is not None and ep.is_file() else None
    if not s.broker_url:
        out["broker"] = "not configured"
        print(json.dumps(out, indent=2))
        return EXIT_FAILED
    client = redis.Redis.from_url(s.broker_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        out["stream_length"] = int(client.xlen(s.stream))
        out["dead_letters"] = int(client.xlen(DEAD_STREAM))
        try:
            groups = client.xinfo_groups(s.stream)
        except redis.ResponseError:
            groups = []
        out["groups"] = [
            {
                "name": g["name"].decode() if isinstance(g["name"], bytes) else g["name"],
                "consumers": g["consumers"],
                "pending": g["pending"],
                "lag": g.get("lag"),
            }
            for g in groups
        ]
    except redis.RedisError as exc:
        out["broker"] = f"down: {exc}"
        print(json.dumps(out, indent=2))
        return EXIT_FAILED
    finally:
        client.close()
    print(json.dumps(out, indent=2, default=str))
    return EXIT_OK


# ----------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, fmt: bool = True) -> None:
    p.add_argument("--dsn", help="override the ClickHouse DSN (chdb:///path or http(s)://…)")
    if fmt:
        p.add_argument(
            "--format",
            choices=["jsonl", "json"],
            default="jsonl",
            help="jsonl: one JSON object per line (default); json: one array",
        )


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit`` and its subcommands on the main parser's subparsers."""
    audit = subparsers.add_parser(
        "audit",
        help="the audit trail: ingest, sql, trace, report, status",
        description="Query the audit trail in ClickHouse, or run the ingester. Works "
        "while the fleet runs (queries go through the running ingester when it holds "
        "the embedded store).",
    )
    sub = audit.add_subparsers(dest="audit_cmd", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser(
        "ingest",
        help="run an ingester: stream -> ClickHouse (foreground, until SIGTERM)",
        description="Reads the audit stream with a consumer group, batches, inserts "
        "exactly once, dead-letters malformed entries, migrates the schema and serves "
        "read-only queries for `audit sql` on loopback.",
    )
    add_ingest_arguments(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "sql",
        help="run one read-only query; prints JSON rows",
        description="Only SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS, run with readonly=1. "
        "Tables: audit_events (one row per stage) and action_results (one row per finished "
        "attempt), in the default database actionfleet (the actionfleet. prefix is "
        "optional). Bind values with {name:Type} and --param name=value. Example: "
        'actionfleet audit sql "SELECT status, count() FROM action_results GROUP BY status"',
    )
    p.add_argument("sql", help="the query, or '-' to read it from stdin")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="query parameter for {NAME:Type} placeholders (repeatable)",
    )
    _common(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser(
        "trace",
        help="every recorded stage of one action, or of every step of a workflow, in order",
    )
    p.add_argument("action_id", help="an action id, or a workflow id (all its steps)")
    _common(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("report", help="canned reports: tenant, usage, denials")
    rsub = p.add_subparsers(dest="report", required=True, metavar="REPORT")
    r = rsub.add_parser("tenant", help="every action of a tenant in the last N days")
    r.add_argument("tenant_id")
    r.add_argument("--days", type=int, default=30, help="look back this many days (30)")
    r.add_argument("--user", default=None, help="only this user_id")
    _common(r)
    r = rsub.add_parser("usage", help="actions and duration per tenant x primitive, one month")
    r.add_argument("--month", default=None, help="YYYY-MM (default: this month, UTC)")
    _common(r)
    r = rsub.add_parser("denials", help="actions denied or stopped for exceeding their scope")
    r.add_argument("--days", type=int, default=7, help="look back this many days (7)")
    r.add_argument("--tenant", default=None, help="only this tenant")
    _common(r)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("status", help="audit stream backlog, pending and dead letters (JSON)")
    p.add_argument("--broker", help="redis:// URL (default: the fleet's)")
    _common(p, fmt=False)
    p.set_defaults(func=cmd_status)
    return audit


def cmd_audit(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m audit.cli …`` behaves like ``actionfleet audit …``."""
    parser = argparse.ArgumentParser(prog="actionfleet")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(cmd_audit())
