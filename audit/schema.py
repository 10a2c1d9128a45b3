"""The audit event's fields and the ClickHouse schema, versioned.

One stream entry carries one event as a single JSON object whose keys are exactly the
``audit_events`` column names, so the ingester can hand a batch to ClickHouse as
``JSONEachRow`` without decoding it in Python (the fast path; see ``audit.ingester``).
``action_results`` is filled by a materialized view from ``finished`` events, inside the
same INSERT, so both tables share one insert deduplication token and one retry.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DATABASE",
    "EVENT_COLUMNS",
    "MIGRATIONS",
    "OTEL_ALIASES",
    "RESULTS_COLUMNS",
    "RESULTS_SELECT",
    "SCHEMA_VERSION",
    "STAGES",
    "Migration",
]

DATABASE = "actionfleet"
SCHEMA_VERSION = 1  # of the event payload; bumped when a field changes meaning
STAGES = ("received", "policy", "started", "finished", "retried", "dead_lettered")

# name -> Python type the emitter writes (the ingester's slow-path validator checks these).
EVENT_COLUMNS: dict[str, type] = {
    "event_id": str,  # UUIDv7: time-ordered
    "event_time": str,  # "YYYY-MM-DD hh:mm:ss.ffffff", UTC
    "schema_version": int,
    "stage": str,
    "status": str,
    "action_id": str,
    "idempotency_key": str,
    "attempt": int,
    "tenant_id": str,
    "agent_id": str,
    "key_id": str,  # the producer key the action claimed (verified unless refused)
    "user_id": str,
    "primitive": str,
    "operation": str,
    "queue": str,
    "worker_host": str,
    "sandbox_id": str,
    "trace_id": str,
    "duration_ms": int,
    "error_type": str,
    "error_message": str,
    "retryable": bool,
    "policy_decision": str,
    "policy_reason": str,
    "policy_rule_id": str,  # v4: the Cedar rule that decided (docs/policy.md)
    "approver": str,  # v4: who approved or denied a parked action
    "input_preview": str,
    "input_sha256": str,
    "input_bytes": int,
    "input_truncated": bool,
    "output_preview": str,
    "output_sha256": str,
    "output_bytes": int,
    "output_truncated": bool,
    "cpu_time_ms": int,
    "peak_memory_bytes": int,
    "bytes_in": int,
    "bytes_out": int,
    "blocked_requests": int,  # requests the egress guard refused during the action
    "cost_units": float,
    "labels": dict,
}

# OpenTelemetry names (gen_ai tool-execution spans, general attributes) as ALIAS columns:
# queries can use either spelling, storage holds one.
OTEL_ALIASES: dict[str, str] = {
    "gen_ai.operation.name": "'execute_tool'",
    "gen_ai.tool.name": "primitive",
    "gen_ai.tool.call.id": "action_id",
    "gen_ai.agent.id": "agent_id",
    "error.type": "error_type",
    "user.id": "user_id",
    "host.name": "worker_host",
    "container.id": "sandbox_id",
    "messaging.destination.name": "queue",
}

_LC = "LowCardinality(String)"
_Z = "CODEC(ZSTD(1))"
_COMMON = f"""
    action_id String {_Z},
    idempotency_key String {_Z},
    attempt UInt16,
    tenant_id {_LC},
    agent_id {_LC},
    user_id String {_Z},
    primitive {_LC},
    operation {_LC},
    queue {_LC},
    worker_host {_LC},
    sandbox_id String {_Z},
    trace_id String {_Z},
    duration_ms UInt32 CODEC(T64, ZSTD(1)),
    error_type {_LC},
    error_message String {_Z},
    retryable Bool,
    policy_decision {_LC},
    policy_reason String {_Z},
    input_preview String CODEC(ZSTD(3)),
    input_sha256 String {_Z},
    input_bytes UInt64 CODEC(T64, ZSTD(1)),
    input_truncated Bool,
    output_preview String CODEC(ZSTD(3)),
    output_sha256 String {_Z},
    output_bytes UInt64 CODEC(T64, ZSTD(1)),
    output_truncated Bool,
    cpu_time_ms UInt64 CODEC(T64, ZSTD(1)),
    peak_memory_bytes UInt64 CODEC(T64, ZSTD(1)),
    bytes_in UInt64 CODEC(T64, ZSTD(1)),
    bytes_out UInt64 CODEC(T64, ZSTD(1)),
    cost_units Float64 CODEC(Gorilla, ZSTD(1)),
    labels Map(LowCardinality(String), String) {_Z},
    schema_version UInt16"""


def _aliases() -> str:
    return ",\n".join(f"    `{name}` String ALIAS {expr}" for name, expr in OTEL_ALIASES.items())


def _stage_list() -> str:
    return ", ".join(f"'{s}'" for s in STAGES)


# Dedup window: a retried batch must still be recognised after this many later inserts.
# At 10k-row batches this covers far more than any claim delay of a dead ingester.
_DEDUP = "non_replicated_deduplication_window = 10000"

_EVENTS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.audit_events (
    event_id UUID,
    event_time DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
    stage {_LC},
    status {_LC},
{_COMMON},
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3) CODEC(Delta, ZSTD(1)),
{_aliases()},
    INDEX idx_action action_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_event event_id TYPE bloom_filter(0.01) GRANULARITY 4,
    CONSTRAINT c_stage CHECK stage IN ({_stage_list()}),
    CONSTRAINT c_event_id CHECK event_id != toUUID('00000000-0000-0000-0000-000000000000'),
    CONSTRAINT c_version CHECK schema_version >= 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant_id, event_time, action_id)
TTL toDateTime(event_time) + INTERVAL {{retention_days}} DAY
SETTINGS {_DEDUP}, ttl_only_drop_parts = 1
"""

_RESULTS_V1 = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.action_results (
    event_id UUID,
    finished_at DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
    started_at DateTime64(6, 'UTC') CODEC(Delta, ZSTD(1)),
    status {_LC},
{_COMMON},
{_aliases()},
    INDEX idx_action action_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(finished_at)
ORDER BY (tenant_id, finished_at, action_id)
TTL toDateTime(finished_at) + INTERVAL {{retention_days}} DAY
SETTINGS {_DEDUP}, ttl_only_drop_parts = 1
"""

_RESULT_COLUMNS_V1 = [c.strip().split()[0] for c in _COMMON.strip().split(",\n")]
# Columns added by later migrations, at the end of the results view's SELECT; each
# migration that adds one makes the view again with the columns known at its version.
_RESULT_COLUMNS_V2 = [*_RESULT_COLUMNS_V1, "key_id"]
_RESULT_COLUMNS_V3 = [*_RESULT_COLUMNS_V2, "blocked_requests"]
_RESULT_COLUMNS = _RESULT_COLUMNS_V3

# The row of ``action_results`` built from a ``finished`` row of ``audit_events``: used by
# the materialized view, and by the ingester to repair a results row an ingester killed
# between the two tables' writes of one INSERT left missing.
# The columns of RESULTS_SELECT, in its order: an INSERT … SELECT must name them, because
# columns added by later migrations do not sit at the end of the table (AFTER agent_id).
RESULTS_COLUMNS = ("event_id", "finished_at", "started_at", "status", *_RESULT_COLUMNS)


def _results_select(columns: list[str]) -> str:
    return f"""SELECT
    event_id,
    event_time AS finished_at,
    event_time - toIntervalMillisecond(duration_ms) AS started_at,
    status,
    {", ".join(columns)}
FROM {DATABASE}.audit_events
WHERE stage = 'finished' AND policy_decision != 'duplicate'"""


RESULTS_SELECT = _results_select(_RESULT_COLUMNS)

_RESULTS_MV_V1 = f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.action_results_mv TO {DATABASE}.action_results
AS {_results_select(_RESULT_COLUMNS_V1)}
"""


def _added_to_both(column: str, result_columns: list[str]) -> tuple[str, ...]:
    """A column added to both tables, and the results view made again with
    ``result_columns`` (the columns known at that migration's version)."""
    return (
        f"ALTER TABLE {DATABASE}.audit_events ADD COLUMN IF NOT EXISTS {column}",
        f"ALTER TABLE {DATABASE}.action_results ADD COLUMN IF NOT EXISTS {column}",
        f"DROP VIEW IF EXISTS {DATABASE}.action_results_mv",
        f"""CREATE MATERIALIZED VIEW {DATABASE}.action_results_mv TO {DATABASE}.action_results
AS {_results_select(result_columns)}""",
    )


# v2: the producer key of each action (authenticated producers, docs/security.md). The
# view is made again with the column; the ingester runs this before it inserts anything.
_KEY_ID = f"key_id {_LC} DEFAULT '' AFTER agent_id"
_V2 = _added_to_both(_KEY_ID, _RESULT_COLUMNS_V2)

# v3: how many requests the egress guard refused during the action (a browse page's
# dropped third-party sub-resources, docs/browse.md). The view is made again with it.
_BLOCKED = "blocked_requests UInt32 DEFAULT 0 CODEC(T64, ZSTD(1)) AFTER bytes_out"
_V3 = _added_to_both(_BLOCKED, _RESULT_COLUMNS_V3)


# v4: governance (docs/policy.md): the rule behind each policy decision, and the approver
# of an action a rule parked. audit_events only: the results view is unchanged.
_V4 = (
    f"ALTER TABLE {DATABASE}.audit_events ADD COLUMN IF NOT EXISTS "
    f"policy_rule_id {_LC} DEFAULT '' AFTER policy_reason",
    f"ALTER TABLE {DATABASE}.audit_events ADD COLUMN IF NOT EXISTS "
    f"approver {_LC} DEFAULT '' AFTER policy_rule_id",
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "audit_events, action_results, results view", (_EVENTS_V1, _RESULTS_V1, _RESULTS_MV_V1)
    ),
    Migration(2, "key_id: the producer key of each action", _V2),
    Migration(3, "blocked_requests: egress refusals of each action", _V3),
    Migration(4, "policy_rule_id, approver: Cedar rules and approvals", _V4),
)

MIGRATIONS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {DATABASE}.schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime('UTC') DEFAULT now()
) ENGINE = MergeTree ORDER BY version
"""

TTL_TABLES = {"audit_events": "event_time", "action_results": "finished_at"}
