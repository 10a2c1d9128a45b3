"""Audit events: from a pipeline ``LifecycleEvent`` to one JSON row, and back for checks.

Building an event is split in two so the action's own thread pays almost nothing:
``snapshot`` (on the action thread) copies the few fields that may still change — the
sandbox id, the policy decision, the secrets registered so far — and ``build`` (on the
emitter's background thread) does the expensive part: redaction, hashing, JSON.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from audit.redact import MASK, Redacted, Scrubber, is_sensitive, redact, scrub
from audit.schema import EVENT_COLUMNS, SCHEMA_VERSION, STAGES

__all__ = [
    "GRANTED_KEY",
    "EventSnapshot",
    "build",
    "encode",
    "format_time",
    "pack",
    "snapshot",
    "uuid7",
    "validate",
]

_STATE_KEY = "_audit"  # per-attempt state kept in ActionContext.extra
# The key an unsigned action was accepted as (a workflow step, by the engine's grant):
# set by the pipeline once authenticated (workers/pipeline.py).
GRANTED_KEY = "_granted_key_id"
_uuid_lock = threading.Lock()
_last_ms = 0
_seq = 0


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit ms timestamp, then a counter, so ids sort by time even
    within one millisecond of one process."""
    global _last_ms, _seq
    with _uuid_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms += 1
                _seq = random.getrandbits(10)
        else:
            _seq = random.getrandbits(10)  # random start, room to count
        _last_ms = ms
        seq = _seq
    # Not a secret, just unique: the random module is ~10x cheaper than a getrandom(2)
    # call per id, and it is reseeded in every forked child.
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | random.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_time(t: datetime) -> str:
    """ClickHouse DateTime64(6) text in UTC; parsed by ClickHouse without best-effort mode."""
    # isoformat is ~4x cheaper than strftime; cut its "+00:00" suffix.
    return t.astimezone(UTC).isoformat(" ", "microseconds")[:26]


def _operation(primitive: str, payload: Any) -> str:
    """The primitive's own verb: code language, files op, HTTP method…"""
    if not isinstance(payload, dict):
        return ""
    if primitive == "code":
        return str(payload.get("language") or "")
    if primitive == "files":
        return str(payload.get("op") or "")
    if primitive == "api":
        return str(payload.get("method") or "GET")
    if primitive == "email":
        return "dry_run" if payload.get("dry_run") else "send"
    if primitive == "browse":
        return "steps" if payload.get("steps") else "goto"
    return ""


@dataclass(slots=True)
class EventSnapshot:
    """What ``build`` needs, copied on the action thread at emit time."""

    event_id: str
    stage: str
    time: datetime
    status: str
    elapsed_ms: int
    ident: dict[str, Any]
    secrets: tuple[str, ...]
    state: dict[str, Any]  # shared per-attempt state (policy decision, cached input preview)
    raw: Any = None  # the action message, for the input preview
    result: Any = None  # ActionResult at ``finished``
    decision: str = ""
    reason: str = ""
    rule_id: str = ""  # the Cedar rule that decided (workers/governance)
    approver: str = ""  # who approved or denied a parked action
    extra_usage: dict[str, Any] = field(default_factory=dict)
    cost_units: float | None = None
    executed: bool = False  # the attempt reached ``started``: it ran, so it costs


# A policy event's status by its decision (anything else: denied).
_POLICY_STATUS = {
    "allow": "allowed",
    "approved": "allowed",
    "require_approval": "awaiting_approval",
    "expired": "expired",
}
_NOT_DENIED = ("allow", "approved", "require_approval")


def snapshot(event: Any) -> EventSnapshot:
    """Copy a ``workers.middleware.LifecycleEvent`` into an ``EventSnapshot`` (cheap)."""
    ctx = event.ctx
    action = ctx.action
    raw = ctx.raw if isinstance(ctx.raw, dict) else {}
    state: dict[str, Any] = ctx.extra.setdefault(_STATE_KEY, {})
    stages: list[str] = state.setdefault("stages", [])
    stages.append(event.stage)
    if event.stage == "policy":
        state["policy"] = (event.decision or "", event.reason or "")
        state["rule"] = (event.rule_id or "", event.approver or "")
    cached = state.get("ident")
    if action is not None and cached is not None:
        # Everything but the sandbox id is fixed for the attempt: built once, copied.
        ident = {**cached, "sandbox_id": ctx.sandbox_id or ""}
    elif action is not None:
        payload = raw.get("payload")
        ident = {
            "action_id": action.action_id,
            "idempotency_key": action.idempotency_key or action.action_id,
            "tenant_id": action.tenant_id,
            "agent_id": action.agent_id,
            "key_id": action.auth.key_id if action.auth is not None else "",
            "user_id": action.user_id or "",
            "labels": dict(action.labels),
        }
    else:  # not parsed (invalid message): keep whatever identifies it
        payload = raw.get("payload")
        ident = {
            k: v if isinstance(v := raw.get(k), str) else ""
            for k in ("action_id", "idempotency_key", "tenant_id", "agent_id", "user_id")
        }
        ident["action_id"] = ctx.action_id or ident["action_id"]
        proof = raw.get("auth")
        key_id = proof.get("key_id") if isinstance(proof, dict) else None
        ident["key_id"] = key_id[:64] if isinstance(key_id, str) else ""
        ident["labels"] = {}
    if action is None or cached is None:
        ident |= {
            "attempt": int(ctx.attempt),
            "primitive": ctx.primitive,
            "operation": _operation(ctx.primitive, payload),
            "queue": ctx.queue,
            "worker_host": ctx.worker or "",
            "sandbox_id": ctx.sandbox_id or "",
            "trace_id": ctx.trace_id or "",
        }
        if action is not None:
            state["ident"] = ident
    if action is not None and not ident["key_id"] and ctx.extra.get(GRANTED_KEY):
        # A workflow step's key, known once its grant is checked (after ``received``).
        ident["key_id"] = state["ident"]["key_id"] = ctx.extra[GRANTED_KEY]
    decision, reason = state.get("policy", ("", ""))
    rule_id, approver = state.get("rule", ("", ""))
    if event.stage == "finished" and event.decision:
        # e.g. "duplicate": a redelivery answered from the idempotency record, not a run.
        decision, reason = event.decision, event.reason or "answered from the stored result"
    result = event.result
    status = event.status or ""
    if event.stage == "policy":
        status = _POLICY_STATUS.get(event.decision or "", "denied")
    elif result is not None:
        status = result.status
    secrets = ctx.extra.get("secrets") or ()
    return EventSnapshot(
        event_id=uuid7(),
        stage=event.stage,
        time=event.time,
        status=status,
        elapsed_ms=result.duration_ms if result is not None else ctx.elapsed_ms(),
        ident=ident,
        secrets=tuple(s for s in secrets if isinstance(s, str)),
        state=state,
        raw=raw if event.stage in ("received", "finished") else None,
        result=result,
        decision=decision,
        reason=reason,
        rule_id=rule_id,
        approver=approver,
        extra_usage=dict(ctx.extra.get("usage") or {}),
        cost_units=ctx.extra.get("cost_units"),
        executed="started" in stages,
    )


def _input_preview(
    snap: EventSnapshot, scrubber: Scrubber, names: frozenset[str], cap: int
) -> Redacted:
    # Cached per attempt: ``finished`` reuses ``received``'s work unless new secrets arrived.
    cached = snap.state.get("input")
    if cached is not None and cached[0] == snap.secrets:
        return cached[1]
    payload = snap.raw.get("payload", snap.raw) if isinstance(snap.raw, dict) else snap.raw
    red = redact(payload, scrubber, names, cap)
    snap.state["input"] = (snap.secrets, red)
    return red


def _usage(result: Any, extra: dict[str, Any]) -> dict[str, int]:
    usage: dict[str, Any] = {}
    output = getattr(result, "output", None)
    if isinstance(output, dict) and isinstance(output.get("usage"), dict):
        usage = output["usage"]
    cpu_s = float(usage.get("cpu_user_s") or 0) + float(usage.get("cpu_system_s") or 0)
    out = {
        "cpu_time_ms": round(cpu_s * 1000),
        "peak_memory_bytes": int(usage.get("max_rss_kb") or 0) * 1024,
    }
    for key in ("cpu_time_ms", "peak_memory_bytes", "bytes_in", "bytes_out", "blocked_requests"):
        if key in extra:
            out[key] = max(0, int(extra[key]))
    return out


def build(
    snap: EventSnapshot, sensitive_fields: frozenset[str], preview_bytes: int
) -> dict[str, Any]:
    """The full, redacted event; keys are exactly the ``audit_events`` columns."""
    scrubber = Scrubber(snap.secrets)
    row: dict[str, Any] = {
        "event_id": snap.event_id,
        "event_time": format_time(snap.time),
        "schema_version": SCHEMA_VERSION,
        "stage": snap.stage,
        "status": snap.status,
        # No secrets in play (the common case): nothing to scrub in the identity fields.
        **(
            {k: scrubber(v) if isinstance(v, str) else v for k, v in snap.ident.items()}
            if scrubber
            else snap.ident
        ),
        "duration_ms": max(0, int(snap.elapsed_ms)),
        "error_type": "",
        "error_message": "",
        "retryable": False,
        "policy_decision": snap.decision,
        "policy_reason": scrub(snap.reason, scrubber),
        "policy_rule_id": snap.rule_id,
        "approver": snap.approver,
        "input_preview": "",
        "input_sha256": "",
        "input_bytes": 0,
        "input_truncated": False,
        "output_preview": "",
        "output_sha256": "",
        "output_bytes": 0,
        "output_truncated": False,
        "cpu_time_ms": 0,
        "peak_memory_bytes": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "blocked_requests": 0,
        "cost_units": 0.0,
    }
    if row["labels"]:
        row["labels"] = {
            scrubber(k): MASK if is_sensitive(k, sensitive_fields) else scrubber(v)
            for k, v in row["labels"].items()
        }
    if snap.raw is not None:
        red = _input_preview(snap, scrubber, sensitive_fields, preview_bytes)
        row |= {
            "input_preview": red.preview,
            "input_sha256": red.sha256,
            "input_bytes": red.size,
            "input_truncated": red.truncated,
            "bytes_in": red.size,
        }
    result = snap.result
    if result is not None:
        if result.output is not None:
            out = redact(result.output, scrubber, sensitive_fields, preview_bytes)
            row |= {
                "output_preview": out.preview,
                "output_sha256": out.sha256,
                "output_bytes": out.size,
                "output_truncated": out.truncated,
                "bytes_out": out.size,
            }
        if result.error is not None:
            row["error_type"] = result.error.type
            row["error_message"] = scrub(result.error.message, scrubber)
            row["retryable"] = bool(result.error.retryable)
        row |= _usage(result, snap.extra_usage)
        if snap.cost_units is not None:
            row["cost_units"] = float(snap.cost_units)
        elif snap.executed:
            # Default price: one unit per executed attempt plus its CPU seconds. Refused
            # actions (denied, invalid, expired) never ran and cost nothing.
            row["cost_units"] = 1.0 + row["cpu_time_ms"] / 1000.0
    elif snap.stage == "policy" and snap.decision not in _NOT_DENIED:
        row["error_type"] = "policy_denied"
        row["error_message"] = row["policy_reason"]
    return row


def encode(row: dict[str, Any]) -> bytes:
    """One JSONEachRow line (no raw newline can occur: JSON escapes them).

    orjson writes the same bytes as ``json.dumps(row, ensure_ascii=False, separators=(",",
    ":"))`` for these rows, ten times faster: encoding was a fifth of the audit's cost.
    """
    return orjson.dumps(row)


def pack(blobs: list[bytes], max_events: int = 100, max_bytes: int = 256 * 1024) -> list[bytes]:
    """Group encoded events into stream entry payloads, one event per line.

    Many events per stream entry is what makes the stream cheap at volume: Redis and
    redis-py pay per entry and per RESP element, not per byte. At low rates an entry
    holds whatever one flush had (often a single event), so latency does not change.
    """
    out: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for blob in blobs:
        if cur and (len(cur) >= max_events or size + len(blob) > max_bytes):
            out.append(b"\n".join(cur))
            cur, size = [], 0
        cur.append(blob)
        size += len(blob) + 1
    if cur:
        out.append(b"\n".join(cur))
    return out


_INT_MAX = {
    "schema_version": 0xFFFF,
    "attempt": 0xFFFF,
    "duration_ms": 0xFFFFFFFF,
    "blocked_requests": 0xFFFFFFFF,
}


def validate(blob: bytes) -> tuple[dict[str, Any] | None, str]:
    """Slow-path check of one stream payload: (row, "") or (None, reason).

    Mirrors what ClickHouse would reject, so a bad entry is named here instead of failing
    a whole batch; entries this misses are isolated by the ingester's bisection.
    """
    if b"\n" in blob or b"\r" in blob:
        return None, "payload contains a raw line break"
    try:
        row = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(row, dict):
        return None, f"not a JSON object but {type(row).__name__}"
    unknown = set(row) - set(EVENT_COLUMNS)
    if unknown:
        return None, f"unknown fields: {sorted(unknown)[:5]}"
    for name in ("event_id", "event_time", "stage", "schema_version"):
        if name not in row:
            return None, f"missing field {name!r}"
    for name, value in row.items():
        expected = EVENT_COLUMNS[name]
        ok = isinstance(value, expected)
        if expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            ok = ok and 0 <= value <= _INT_MAX.get(name, 2**64 - 1)
        elif expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif expected is dict:
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            )
        if not ok:
            return None, f"field {name!r} has a bad value {str(value)[:60]!r}"
    if row["stage"] not in STAGES:
        return None, f"unknown stage {row['stage']!r}"
    if row["schema_version"] < 1:
        return None, "schema_version must be >= 1"
    try:
        if uuid.UUID(row["event_id"]).int == 0:
            return None, "event_id is the nil UUID"
        datetime.strptime(row["event_time"], "%Y-%m-%d %H:%M:%S.%f")
    except ValueError as exc:
        return None, f"bad id or time: {exc}"
    return row, ""
