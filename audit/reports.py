"""Canned queries: trace, tenant activity, monthly usage, denials, and the demo summary.

Every function takes a ``Reader`` (``audit.store.open_reader``) or a raw clickhouse-connect
client and returns JSON-ready rows (list of dicts). Values are bound as ClickHouse query
parameters, never formatted into SQL. Windows ("the last 30 days") end at ``now``, which
defaults to the current time and can be given, so a report is reproducible.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

from audit.config import STREAM
from audit.schema import DATABASE
from audit.store import ClientReader, Reader, RemoteReader

__all__ = [
    "demo_summary",
    "denials",
    "summary",
    "tenant",
    "trace",
    "usage",
    "wait_until_ingested",
]

E = f"{DATABASE}.audit_events"
R = f"{DATABASE}.action_results"

# What "denied or exceeded its scope" means for the safety report.
SCOPE_ERRORS = (
    "policy_denied",
    "quota_exceeded",
    "network_blocked",
    "rate_limited",
    "resource_exhausted",
    "timeout",
)


def _reader(source: Any) -> Reader:
    """Accept a Reader, or a bare clickhouse-connect client (wrapped read-only)."""
    if isinstance(source, ClientReader | RemoteReader):
        return source
    return ClientReader(source, own=False)


def _rows(source: Any, sql: str, **params: Any) -> list[dict[str, Any]]:
    return _reader(source).query(sql, params).dicts()


# The end of a window, bound as microseconds since the epoch (no time-zone parsing).
NOW = "fromUnixTimestamp64Micro({now_us:Int64}, 'UTC')"


def _now_us(now: datetime | None) -> int:
    when = now or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("now must be time-zone aware (e.g. datetime.now(UTC))")
    return int(when.timestamp() * 1_000_000)


def trace(source: Any, action_id: str) -> list[dict[str, Any]]:
    """Every recorded stage of one action, all attempts, in order; or, when ``action_id``
    is a workflow's id, of every step of that workflow (its ``workflow_id`` label)."""
    rows = _trace(source, "action_id = {a:String}", action_id)
    return rows or _trace(source, "labels['workflow_id'] = {a:String}", action_id)


def _trace(source: Any, where: str, value: str) -> list[dict[str, Any]]:
    return _rows(
        source,
        f"""SELECT event_time, stage, status, attempt, event_id, action_id, tenant_id, agent_id,
                  key_id, user_id, primitive, operation, queue, worker_host, sandbox_id, trace_id,
                  duration_ms, policy_decision, policy_reason, error_type, error_message,
                  retryable, input_preview, input_sha256, input_bytes, output_preview,
                  output_sha256, output_bytes, cpu_time_ms, peak_memory_bytes, bytes_in,
                  bytes_out, cost_units, labels, schema_version
           FROM {E} WHERE {where}
           ORDER BY event_time, event_id""",
        a=value,
    )


def tenant(
    source: Any,
    tenant_id: str,
    days: int = 30,
    user_id: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Compliance: every action of a tenant (optionally one user) in the ``days`` before
    ``now``, one row per action, including ones refused or still running."""
    user_clause = "AND user_id = {u:String}" if user_id else ""
    return _rows(
        source,
        f"""SELECT action_id,
                  min(event_time) AS first_seen,
                  max(event_time) AS last_seen,
                  any(agent_id) AS agent_id,
                  any(user_id) AS user_id,
                  any(primitive) AS primitive,
                  anyIf(operation, operation != '') AS operation,
                  max(attempt) AS attempts,
                  argMax(stage, event_time) AS last_stage,
                  argMaxIf(status, event_time, stage = 'finished') AS status,
                  argMaxIf(error_type, event_time, stage = 'finished') AS error_type,
                  anyIf(policy_decision, stage = 'policy') AS policy_decision,
                  maxIf(duration_ms, stage = 'finished') AS duration_ms,
                  anyIf(input_sha256, input_sha256 != '') AS input_sha256
           FROM {E}
           WHERE tenant_id = {{t:String}}
             AND event_time >= {NOW} - toIntervalDay({{d:UInt32}})
             AND event_time <= {NOW} {user_clause}
           GROUP BY action_id
           ORDER BY first_seen, action_id""",
        t=tenant_id,
        d=int(days),
        now_us=_now_us(now),
        **({"u": user_id} if user_id else {}),
    )


MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def usage(source: Any, month: str | None = None) -> list[dict[str, Any]]:
    """Billing: actions, attempts and duration per tenant x primitive for ``YYYY-MM``."""
    month = month or datetime.now(UTC).strftime("%Y-%m")
    m = MONTH.match(month)
    if not m:
        raise ValueError(f"month must look like 2026-11, not {month!r}")
    return _rows(
        source,
        f"""SELECT tenant_id, primitive,
                  uniqExact(action_id) AS actions,
                  count() AS attempts,
                  countIf(status = 'succeeded') AS succeeded,
                  countIf(status != 'succeeded') AS not_succeeded,
                  sum(duration_ms) AS total_duration_ms,
                  round(avg(duration_ms), 1) AS avg_duration_ms,
                  quantile(0.95)(duration_ms) AS p95_duration_ms,
                  sum(cpu_time_ms) AS cpu_time_ms,
                  round(sum(cost_units), 3) AS cost_units
           FROM {R}
           WHERE toYYYYMM(finished_at) = {{m:UInt32}}
           GROUP BY tenant_id, primitive
           ORDER BY tenant_id, primitive""",
        m=int(m.group(1)) * 100 + int(m.group(2)),
    )


def denials(
    source: Any, days: int = 7, tenant_id: str | None = None, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Safety: actions denied by policy or stopped for exceeding their scope, in the
    ``days`` before ``now``."""
    tenant_clause = "AND tenant_id = {t:String}" if tenant_id else ""
    return _rows(
        source,
        f"""SELECT finished_at, tenant_id, agent_id, user_id, primitive, operation, action_id,
                  attempt, status, error_type,
                  if(policy_decision = 'deny', policy_reason, error_message) AS reason
           FROM {R}
           WHERE finished_at >= {NOW} - toIntervalDay({{d:UInt32}})
             AND finished_at <= {NOW}
             AND (status = 'denied' OR error_type IN {{e:Array(String)}}) {tenant_clause}
           ORDER BY finished_at DESC
           LIMIT 10000""",
        d=int(days),
        now_us=_now_us(now),
        e=list(SCOPE_ERRORS),
        **({"t": tenant_id} if tenant_id else {}),
    )


def summary(
    source: Any,
    since_minutes: int = 60,
    tenant_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """A few lines for ``actionfleet demo``: events by stage, results by status, in the
    ``since_minutes`` before ``now``."""
    where = f"event_time >= {NOW} - toIntervalMinute({{m:UInt32}}) AND event_time <= {NOW}"
    params: dict[str, Any] = {"m": int(since_minutes), "now_us": _now_us(now)}
    if tenant_id:
        where += " AND tenant_id = {t:String}"
        params["t"] = tenant_id
    stages = _rows(
        source, f"SELECT stage, count() AS n FROM {E} WHERE {where} GROUP BY stage", **params
    )
    statuses = _rows(
        source,
        f"SELECT status, count() AS n FROM {E} WHERE {where} AND stage = 'finished' "
        "GROUP BY status ORDER BY status",
        **params,
    )
    order = ["received", "policy", "started", "finished", "retried", "dead_lettered"]
    by_stage = {r["stage"]: r["n"] for r in stages}
    stage_text = ", ".join(f"{s}={by_stage[s]}" for s in order if s in by_stage) or "none"
    status_text = ", ".join(f"{r['status']}={r['n']}" for r in statuses) or "none"
    return (
        f"audit: events by stage: {stage_text}\n"
        f"audit: finished actions by status: {status_text}\n"
        'audit: try `actionfleet audit trace ACTION_ID` or `actionfleet audit sql "SELECT …"`'
    )


def wait_until_ingested(redis_url: str, stream: str = STREAM, timeout_s: float = 30) -> bool:
    """True once nothing waits in the audit stream (all entries inserted and acknowledged)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                if int(client.xlen(stream)) == 0:
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.2)
        return False
    finally:
        client.close()


def demo_summary(timeout_s: float = 30.0, tenant_id: str | None = "demo") -> str:
    """The end of ``actionfleet demo``: wait for the ingester to catch up, then summarize
    through the running ingester's query endpoint (or the store itself)."""
    from audit.config import audit_settings
    from audit.store import StoreUnavailable, open_reader

    s = audit_settings()
    note = ""
    if s.broker_url and not wait_until_ingested(s.broker_url, s.stream, timeout_s):
        note = "audit: some events are still on their way to the store\n"
    try:
        reader = open_reader(s.dsn)
    except StoreUnavailable as exc:
        return f"{note}audit: store unavailable: {exc}"
    try:
        return note + summary(reader, since_minutes=60, tenant_id=tenant_id)
    except Exception as exc:  # the demo's own result stands even if the summary fails
        return f"{note}audit: summary failed: {str(exc)[:300]}"
    finally:
        reader.close()
