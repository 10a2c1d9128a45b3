"""Cross-cutting concerns hook into the pipeline here (dramatiq-style middleware).

A middleware may implement any of the hooks; the pipeline calls them in order. A hook
that raises an ``ActionError`` in ``before_execute`` ends the action with that error (how
rate limits and quotas plug in). ``on_event`` receives every lifecycle event and must not
raise: losing an action because its audit trail hiccupped is worse than the hiccup.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from producer.models import Action, ActionResult

__all__ = [
    "ActionContext",
    "LifecycleEvent",
    "LogMiddleware",
    "Middleware",
    "Reschedule",
    "Stage",
]

Stage = Literal["received", "policy", "started", "finished", "retried", "dead_lettered"]


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Re-queue the same message after ``countdown_s`` with ``state`` (set by
    ``workers.reliability``; the Celery task does the re-queue)."""

    countdown_s: float
    reason: str
    state: dict[str, Any]


@dataclass(slots=True)
class ActionContext:
    """Everything the pipeline knows about one execution attempt."""

    primitive: str
    queue: str
    worker: str
    attempt: int
    raw: dict[str, Any]
    action: Action | None = None
    trace_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sandbox_id: str | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_mono: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)
    # The Celery task id the message came with (None outside Celery): the result is
    # stored under it, so it must be the action's own (producer.transport.task_id_for).
    task_id: str | None = None
    # False when no result may be stored under ``task_id`` (it names another action).
    store_result: bool = True
    # Set when this delivery is not the last: the task re-queues the message (retry or
    # deferral) instead of returning a result.
    reschedule: Reschedule | None = None
    # Set when a rule parked the action for a human's approval: the task stores the
    # not-final ``awaiting_approval`` result and acknowledges the message.
    awaiting_approval: bool = False

    @property
    def action_id(self) -> str | None:
        if self.action is not None:
            return self.action.action_id
        value = self.raw.get("action_id") if isinstance(self.raw, dict) else None
        return value if isinstance(value, str) else None

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started_mono) * 1000)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    stage: Stage
    ctx: ActionContext
    time: datetime
    status: str | None = None
    decision: str | None = None
    reason: str | None = None
    result: ActionResult | None = None
    rule_id: str | None = None  # the Cedar rule that decided (workers/governance)
    approver: str | None = None  # who approved or denied a parked action


class Middleware:
    """Base class: every hook is a no-op."""

    def before_execute(self, ctx: ActionContext) -> None:
        """Runs after policy, before the executor. Raise an ``ActionError`` to stop."""

    def after_execute(self, ctx: ActionContext, result: ActionResult) -> None:
        """Runs once the result is final, whatever its status."""

    def on_event(self, event: LifecycleEvent) -> None:
        """Receives every lifecycle event. Must not raise."""

    def close(self) -> None:
        """Release resources at worker shutdown."""


class LogMiddleware(Middleware):
    """Writes each lifecycle event as one JSON line to the ``actionfleet.events`` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("actionfleet.events")

    def on_event(self, event: LifecycleEvent) -> None:
        if not self.log.isEnabledFor(logging.INFO):  # the JSON costs more than the action
            return
        ctx = event.ctx
        record: dict[str, Any] = {
            "stage": event.stage,
            "time": event.time.isoformat(),
            "action_id": ctx.action_id,
            "primitive": ctx.primitive,
            "attempt": ctx.attempt,
            "worker": ctx.worker,
            "trace_id": ctx.trace_id,
        }
        if ctx.action is not None:
            record |= {"tenant_id": ctx.action.tenant_id, "agent_id": ctx.action.agent_id}
        if event.status:
            record["status"] = event.status
        if event.decision:
            record |= {"decision": event.decision, "reason": event.reason}
        if event.rule_id:
            record["rule_id"] = event.rule_id
        if event.approver:
            record["approver"] = event.approver
        if event.result is not None:
            record["duration_ms"] = event.result.duration_ms
            if event.result.error is not None:
                record["error_type"] = event.result.error.type
        self.log.info(json.dumps(record))
