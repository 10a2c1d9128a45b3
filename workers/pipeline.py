"""The execution pipeline, top to bottom in one place.

    validate -> authenticate (the producer key's signature and scope) -> deadline ->
    policy (ceilings, Cedar rules) -> approval gate (rules that ask a human) ->
    reliability.admit (idempotency, rate, concurrency, quota) -> middleware ->
    execute -> normalize -> reliability.settle (retry / final / dead letter) -> events

``Pipeline.run`` never raises: every outcome, including a bug in an executor, becomes an
``ActionResult`` the agent can act on, and every stage emits a lifecycle event. When the
delivery is not the last one (deferred over a limit, or a retry is due) ``run`` sets
``ctx.reschedule`` and emits ``retried`` instead of ``finished``; the Celery task then
re-queues the same message under the same task id (workers/app.py). When a rule parks
the action for approval, ``run`` sets ``ctx.awaiting_approval`` and returns the
``awaiting_approval`` result; the decided message comes back later (workers/governance).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from audit.events import GRANTED_KEY
from producer.errors import (
    ActionError,
    DeadlinePassed,
    InternalError,
    InvalidAction,
    PolicyDenied,
    Unauthenticated,
    ValidationError_,
)
from producer.models import ActionResult
from producer.transport import task_id_for
from producer.validation import parse_action
from workers.auth.verify import Authenticator
from workers.executors import ExecutorRegistry
from workers.governance.gate import ApprovalGate, AwaitingApproval
from workers.middleware import ActionContext, LifecycleEvent, Middleware, Reschedule, Stage
from workers.policy import Grant, PolicyEngine
from workers.reliability import Deferred, Duplicate, Reliability

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(
        self,
        policy: PolicyEngine,
        executors: ExecutorRegistry,
        middleware: Sequence[Middleware] = (),
        reliability: Reliability | None = None,
        auth: Authenticator | None = None,
        approvals: ApprovalGate | None = None,
    ) -> None:
        self.policy = policy
        self.executors = executors
        self.middleware = list(middleware)
        self.reliability = reliability
        self.auth = auth
        self.approvals = approvals

    def run(self, ctx: ActionContext) -> dict[str, Any]:
        """Execute one delivery of an action; returns the result as JSON-ready dict."""
        try:
            output = self._execute(ctx)
            result = self._result(ctx, "succeeded", output=output)
        except Duplicate as dup:
            # Delivered again after it completed: the stored result, nothing runs again.
            stored = ActionResult.model_validate(dup.result)
            self._emit("finished", ctx, status=stored.status, decision="duplicate", result=stored)
            return dup.result
        except Deferred as deferred:
            assert self.reliability is not None
            ctx.reschedule = self.reliability.deferred(ctx, deferred)
            self._emit("retried", ctx, decision="deferred", reason=deferred.reason)
            return {}
        except AwaitingApproval as parked:
            # Not final: nothing was admitted or run; the decided message comes back.
            ctx.awaiting_approval = True
            result = self._result(ctx, "awaiting_approval", output=parked.output())
            return result.model_dump(mode="json")
        except InvalidAction as exc:
            result = self._result(
                ctx,
                "invalid",
                error={
                    "type": "validation_error",
                    "message": str(exc),
                    "retryable": False,
                    "details": {"errors": exc.errors},
                },
            )
        except ActionError as exc:
            result = self._result(ctx, exc.status, output=exc.output, error=exc.to_info())
        except Exception as exc:  # a bug must still produce a result, never a lost action
            log.exception("executor crashed on action %s", ctx.action_id)
            err = InternalError(f"the worker failed unexpectedly ({type(exc).__name__})")
            result = self._result(ctx, "failed", error=err.to_info())
        dumped = result.model_dump(mode="json")  # once: settle stores this same dict
        ctx.reschedule = self._settle(ctx, result, dumped)
        for m in self.middleware:
            self._guard(m.after_execute, ctx, result)
        if ctx.reschedule is not None:
            reason = ctx.reschedule.reason
            self._emit("retried", ctx, status=result.status, decision="retry", reason=reason)
            return dumped
        if "dead_letter" in ctx.extra:
            self._emit("dead_lettered", ctx, status=result.status, result=result)
        self._emit("finished", ctx, status=result.status, result=result)
        return dumped

    def _settle(
        self, ctx: ActionContext, result: ActionResult, dumped: dict[str, Any]
    ) -> Reschedule | None:
        if self.reliability is None:
            return None
        try:
            return self.reliability.settle(ctx, result, dumped)
        except Exception:
            # The result stands even if Redis failed us here; leases lapse on their own.
            log.exception("could not settle action %s", ctx.action_id)
            return None

    def _execute(self, ctx: ActionContext) -> dict[str, Any]:
        action = parse_action(ctx.raw)
        ctx.action = action
        self._emit("received", ctx)
        if ctx.task_id is not None and ctx.task_id != task_id_for(
            action.tenant_id, action.action_id
        ):
            # Its result would land in another action's (or tenant's) result key: refuse,
            # and store nothing there (the task checks ``store_result``).
            ctx.store_result = False
            raise ValidationError_(
                f"the message came as task {ctx.task_id[:80]!r}, not as its own "
                f"{task_id_for(action.tenant_id, action.action_id)!r}: send it through "
                "ActionClient",
                field="task_id",
            )
        if self.auth is not None:
            # Before anything of the action is trusted: who sent it, and may they. The
            # replay check rides in the admission round trip below when there is one.
            try:
                identity = self.auth.authenticate(
                    action, ctx.raw, defer_nonce=self.reliability is not None
                )
            except ActionError as exc:
                self._emit("policy", ctx, decision="deny", reason=exc.message)
                raise
            if identity is not None and identity.nonce is not None:
                ctx.extra["_nonce"] = identity.nonce
            if identity is not None and action.auth is None:  # a workflow step's grant
                ctx.extra[GRANTED_KEY] = identity.key_id
        if action.primitive != ctx.primitive:
            raise ValidationError_(
                f"a {action.primitive!r} action arrived on queue {ctx.queue!r}; "
                f"send it to actions.{action.primitive}",
                field="primitive",
            )
        if action.deadline is not None and datetime.now(UTC) > action.deadline:
            raise DeadlinePassed(
                f"the deadline {action.deadline.isoformat()} passed before the action "
                "started; send it again with a later deadline",
                deadline=action.deadline.isoformat(),
            )
        if not self.executors.supports(action.primitive):
            raise ValidationError_(
                f"primitive {action.primitive!r} has no executor in this fleet version",
                field="primitive",
            )
        try:
            grant = self.policy.authorize(action)
        except ActionError as exc:
            rule = exc.details.get("rule_id")
            self._emit("policy", ctx, decision="deny", reason=exc.message, rule_id=rule)
            raise
        if grant.needs_approval:
            self._approval(ctx, action, grant)
        else:
            rule = grant.verdict.rule.id if grant.verdict is not None else None
            self._emit("policy", ctx, decision="allow", reason=grant.reason, rule_id=rule)
        if self.reliability is not None:
            try:
                self.reliability.admit(ctx, action, grant)
            except Unauthenticated as exc:  # the deferred replay check refused it
                self._emit("policy", ctx, decision="deny", reason=exc.message)
                raise
        for m in self.middleware:
            m.before_execute(ctx)
        executor = self.executors.get(action.primitive)
        self._emit("started", ctx)
        return executor.execute(action, grant, ctx)

    def _approval(self, ctx: ActionContext, action: Any, grant: Grant) -> None:
        """A rule asks a human: park the action, or carry out the decision made on it."""
        verdict = grant.verdict
        assert verdict is not None
        rule = verdict.rule.id
        if self.approvals is None:
            exc = PolicyDenied(
                f"rule {rule!r} needs a human's approval and this worker has no approval "
                "store; the action was not run",
                reason="approval_unavailable",
                rule_id=rule,
            )
            self._emit("policy", ctx, decision="deny", reason=exc.message, rule_id=rule)
            raise exc
        try:
            record = self.approvals.check(ctx, action, verdict)
        except AwaitingApproval as parked:
            if parked.first:  # the approval request, audited once
                why = f"needs approval: {verdict.rule.description}"
                self._emit("policy", ctx, decision="require_approval", reason=why, rule_id=rule)
            raise
        except ActionError as exc:
            d = exc.details
            outcome = {"approval_denied": "approval_denied", "approval_timeout": "expired"}
            self._emit(
                "policy",
                ctx,
                decision=outcome.get(str(d.get("reason")), "deny"),
                reason=str(d.get("approver_reason") or exc.message),
                rule_id=rule,
                approver=d.get("approver"),
            )
            raise
        self._emit(
            "policy",
            ctx,
            decision="approved",
            reason=record.reason,
            rule_id=rule,
            approver=record.decided_by,
        )

    def _result(
        self,
        ctx: ActionContext,
        status: str,
        *,
        output: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> ActionResult:
        return ActionResult(
            action_id=ctx.action_id or "",
            primitive=ctx.primitive,
            status=status,  # type: ignore[arg-type]
            output=output,
            error=error,  # type: ignore[arg-type]
            attempt=ctx.attempt,
            started_at=ctx.started_at,
            finished_at=datetime.now(UTC),
            duration_ms=ctx.elapsed_ms(),
            worker=ctx.worker,
        )

    def _emit(self, stage: Stage, ctx: ActionContext, **fields: Any) -> None:
        event = LifecycleEvent(stage=stage, ctx=ctx, time=datetime.now(UTC), **fields)
        for m in self.middleware:
            self._guard(m.on_event, event)

    @staticmethod
    def _guard(hook: Any, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # observability must never fail the action
            log.exception("middleware hook %r failed", hook)

    def close(self) -> None:
        self.executors.close()
        for m in self.middleware:
            self._guard(m.close)
