"""The workflow engine: start, advance, cancel. Everything it knows is in Redis.

``start`` verifies the producer's signed workflow (key usable, scope covering the tenant,
the agent and every primitive of every step), stores it, and schedules ``advance``.
``advance`` runs under the workflow's lock and moves it as far as it can:

    run phase:        for each step in order -- its result recorded? next. Sent? read its
                      result (none yet: come back later). Not sent? ``when`` false: skipped;
                      else resolve its ``$ref``s, grant and send it, come back later.
                      A step that did not succeed ends the run phase.
    compensate phase: for each succeeded step with a compensation, newest first, the same
                      send / read cycle; then the workflow ends failed (or cancelled, or
                      timed_out).

A step is sent as an ordinary action on its primitive's queue, with an action id and an
idempotency key (``wf:<id>:<step>``) derived from the workflow, so the engine sending it
again after a crash is the same task and never runs a completed step twice. One chain of
delayed ``advance`` tasks per workflow (a token in the state retires older chains) polls
for step results and the deadline; ``acks_late`` redelivers a chain whose worker died.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, states
from pydantic import ValidationError

from producer.errors import InvalidAction
from producer.models import queue_for, task_name_for
from producer.transport import kwargs_repr, redis_priority, task_id_for
from producer.validation import parse_action
from producer.workflows import (
    START_TASK,
    WORKFLOW_QUEUE,
    WorkflowSpec,
    WorkflowStep,
    step_action_id,
)
from workers.auth.grants import GrantStore
from workers.auth.keys import KeyStore
from workers.workflows.refs import RefError, condition_holds, resolve
from workers.workflows.state import TERMINAL, WorkflowState, WorkflowStore
from workers.workflows.status import announce, iso, status_of
from workers.workflows.verify import Refused, verify_message

__all__ = ["ADVANCE_TASK", "START_TASK", "Engine"]

log = logging.getLogger(__name__)
ADVANCE_TASK = "actionfleet.workflow.advance"
POLL_MIN_S, POLL_MAX_S = 0.05, 2.0


@dataclass
class Engine:
    app: Celery
    client: redis.Redis
    auth_required: bool = True
    skew_s: float = 300.0
    result_expires_s: int = 86_400

    def __post_init__(self) -> None:
        self.store = WorkflowStore(self.client)
        self.keys = KeyStore(self.client)
        self.grants = GrantStore(self.client)

    # ---------------------------------------------------------------- entry points

    def receive(self, message: dict[str, Any]) -> None:
        """A producer's signed message: ``{"op": "run", "workflow": {...}}`` or
        ``{"op": "cancel", "workflow_id", "tenant_id", "agent_id"}``."""
        try:
            if message.get("op") == "cancel":
                self._cancel(message)
            else:
                self._start(message)
        except Refused as exc:
            log.warning("workflow message refused: %s", exc)
            if message.get("op") != "cancel":
                self._refuse(message, str(exc))

    def _refuse(self, message: dict[str, Any], reason: str) -> None:
        """Tell the producer waiting on it why its workflow will not run. Only where the
        workflow has no state and no status yet (SET NX): a forged message can neither
        overwrite a real workflow's status nor keep a real one from starting (its start
        writes its own status over this one)."""
        try:
            spec = WorkflowSpec.model_validate(message.get("workflow"))
        except ValidationError:
            return  # no workflow id to answer under
        if self.store.load(spec.workflow_id) is not None:
            return
        now = iso(time.time())
        status = {
            "workflow_id": spec.workflow_id,
            "name": spec.name,
            "tenant_id": spec.tenant_id,
            "agent_id": spec.agent_id,
            "key_id": None,
            "status": "refused",
            "reason": reason,
            "created_at": now,
            "finished_at": now,
            "steps": [],
        }
        self._announce(spec.tenant_id, spec.workflow_id, status, final=True, only_new=True)

    def _verify(self, message: dict[str, Any], tenant: str, agent: str, prims: set[str]) -> str:
        return verify_message(
            self.keys,
            message,
            tenant,
            agent,
            prims,
            auth_required=self.auth_required,
            skew_s=self.skew_s,
        )

    def _start(self, message: dict[str, Any]) -> None:
        try:
            spec = WorkflowSpec.model_validate(message.get("workflow"))
        except ValidationError as exc:
            raise Refused(f"not a workflow: {exc.errors()[:3]}") from None
        key_id = self._verify(message, spec.tenant_id, spec.agent_id, set(spec.primitives()))
        now = time.time()
        deadline = "" if spec.deadline_s is None else repr(now + spec.deadline_s)
        token = uuid.uuid4().hex
        fields = {
            "key_id": key_id,
            "status": "running",
            "phase": "run",
            "deadline": deadline,
            "token": token,
            "created_at": iso(now),
        }
        if self.store.create(spec, fields):
            log.info("workflow %s started (%d steps)", spec.workflow_id, len(spec.steps))
            state = self.store.load(spec.workflow_id)
            assert state is not None
            self._publish(state)
            self._schedule(spec.workflow_id, token, 0.0)

    def _cancel(self, message: dict[str, Any]) -> None:
        workflow_id = str(message.get("workflow_id", ""))
        state = self.store.load(workflow_id)
        if state is None:
            raise Refused(f"cancel of unknown workflow {workflow_id}")
        spec = state.spec
        if message.get("tenant_id") != spec.tenant_id:
            raise Refused(f"cancel of workflow {workflow_id} names another tenant")
        key_id = self._verify(message, spec.tenant_id, spec.agent_id, set())
        lock = self._lock_or_none(workflow_id)
        if lock is None:  # the holder is advancing it: ask again shortly
            self.app.send_task(
                START_TASK, kwargs={"message": message}, queue=WORKFLOW_QUEUE, countdown=0.2
            )
            return
        try:
            state = self.store.load(workflow_id)
            if state is None or state.status in TERMINAL or state.phase == "compensate":
                return
            token = uuid.uuid4().hex  # retires the running chain
            by = f" by key {key_id}" if key_id else ""
            self.store.update(
                state,
                phase="compensate",
                status="compensating",
                final="cancelled",
                reason=f"cancelled{by}",
                token=token,
            )
            self._publish(state)
        finally:
            lock.release()
        self._schedule(workflow_id, token, 0.0)

    def advance(self, workflow_id: str, token: str, delay: float = 0.0) -> None:
        lock = self._lock_or_none(workflow_id)
        if lock is None:
            self._schedule(workflow_id, token, max(0.2, delay))
            return
        try:
            state = self.store.load(workflow_id)
            if state is None or state.get("token") != token or state.status in TERMINAL:
                return
            waiting = self._advance(state)
        finally:
            lock.release()
        if waiting is not None:  # a step is out: come back, a little later each time
            next_delay = POLL_MIN_S if waiting else min(POLL_MAX_S, max(POLL_MIN_S, delay * 2))
            self._schedule(workflow_id, token, next_delay)

    # ---------------------------------------------------------------- the state machine

    def _advance(self, state: WorkflowState) -> bool | None:
        """Move ``state`` as far as it goes. None: it ended; True: a step was just sent;
        False: still waiting on one."""
        spec = state.spec
        deadline = state.get("deadline")
        if state.phase == "run" and deadline and time.time() > float(deadline):
            self.store.update(
                state,
                phase="compensate",
                status="compensating",
                final="timed_out",
                reason=f"the workflow's deadline of {spec.deadline_s}s passed",
            )
        if state.phase == "run":
            for step in spec.steps:
                outcome = self._step(state, step, "run")
                if outcome is not None:
                    return outcome
                result = state.result(step.id)
                assert result is not None
                if result["status"] not in ("succeeded", "skipped"):
                    self.store.update(
                        state,
                        phase="compensate",
                        status="compensating",
                        final="failed",
                        reason=f"step {step.id!r} ended {result['status']}",
                    )
                    self._publish(state)
                    break
            else:
                self.store.update(state, status="succeeded", finished_at=iso(time.time()))
                self._publish(state)
                return None
        # Compensation: a step still out (cancel, deadline) is waited for first.
        for step in spec.steps:
            if state.sent(step.id, "run") and state.result(step.id) is None:
                outcome = self._step(state, step, "run")
                if outcome is not None:
                    return outcome
        for step in reversed(spec.steps):
            done = state.result(step.id)
            if step.compensate is None or done is None or done["status"] != "succeeded":
                continue
            outcome = self._step(state, step, "compensate")
            if outcome is not None:
                return outcome
        self.store.update(state, status=state.get("final", "failed"), finished_at=iso(time.time()))
        self._publish(state)
        return None

    def _step(self, state: WorkflowState, step: WorkflowStep, phase: str) -> bool | None:
        """None once ``step`` (its run or its compensation) has a recorded result."""
        if state.result(step.id, phase) is not None:
            return None
        spec = state.spec
        action_id = step_action_id(spec.workflow_id, step.id, phase)
        if state.sent(step.id, phase):
            meta = self.app.backend.get_task_meta(task_id_for(spec.tenant_id, action_id))
            value = meta.get("result")
            if meta.get("status") not in states.READY_STATES or not isinstance(value, dict):
                return False
            self._record(state, step.id, phase, value)
            return None
        if phase == "run" and not condition_holds(step.when, state.results()):
            self._record(state, step.id, phase, {"status": "skipped", "action_id": None})
            return None
        template = step.action if phase == "run" else step.compensate
        assert template is not None
        try:
            message = self._message(state, step, phase, action_id, template)
        except (RefError, InvalidAction) as exc:
            error = {"type": "validation_error", "message": str(exc), "retryable": False}
            result = {"status": "invalid", "action_id": action_id, "error": error, "output": None}
            self._record(state, step.id, phase, result)
            return None
        self.grants.put(spec.workflow_id, step.id, phase, state.get("key_id"), message)
        self.app.send_task(
            task_name_for(message["primitive"]),
            kwargs={"message": message},
            queue=queue_for(message["primitive"]),
            declare=[],
            task_id=task_id_for(spec.tenant_id, action_id),
            priority=redis_priority(int(message.get("priority", 0))),
            argsrepr="()",
            kwargsrepr=kwargs_repr(message["primitive"], action_id, spec.tenant_id),
        )
        self.store.update(state, **{f"s:{step.id}:{phase}": iso(time.time())})
        self._publish(state)
        return True

    def _message(
        self,
        state: WorkflowState,
        step: WorkflowStep,
        phase: str,
        action_id: str,
        template: dict[str, Any],
    ) -> dict[str, Any]:
        spec = state.spec
        results = state.results()
        if phase == "compensate":  # a compensation sees its own step's result too
            results[step.id] = state.result(step.id) or {}
        raw = resolve(template, results)
        labels = dict(raw.get("labels") or {})
        labels |= {"workflow_id": spec.workflow_id, "workflow_step": step.id}
        if phase == "compensate":
            labels["workflow_phase"] = phase
        suffix = "" if phase == "run" else ":compensate"
        raw |= {
            "tenant_id": spec.tenant_id,
            "agent_id": spec.agent_id,
            "action_id": action_id,
            "idempotency_key": f"wf:{spec.workflow_id}:{step.id}{suffix}",
            "labels": labels,
            "workflow": {"id": spec.workflow_id, "step": step.id, "phase": phase},
        }
        deadline = state.get("deadline")
        if deadline and phase == "run":
            raw["deadline"] = iso(float(deadline))
        return parse_action(raw).model_dump(mode="json", by_alias=True)

    def _record(self, state: WorkflowState, step: str, phase: str, result: dict) -> None:
        keep = {k: result.get(k) for k in ("status", "action_id", "output", "error")}
        self.store.update(state, **{f"{'r' if phase == 'run' else 'c'}:{step}": json.dumps(keep)})

    # ---------------------------------------------------------------- plumbing

    def _lock_or_none(self, workflow_id: str) -> Any:
        return self.store.lock(workflow_id)

    def _schedule(self, workflow_id: str, token: str, delay: float) -> None:
        self.app.send_task(
            ADVANCE_TASK,
            args=[workflow_id, token, delay],
            queue=WORKFLOW_QUEUE,
            countdown=delay or None,
        )

    def _publish(self, state: WorkflowState) -> None:
        spec = state.spec
        final = state.status in TERMINAL
        self._announce(spec.tenant_id, spec.workflow_id, status_of(state), final=final)

    def _announce(
        self,
        tenant_id: str,
        workflow_id: str,
        status: dict[str, Any],
        *,
        final: bool,
        only_new: bool = False,
    ) -> None:
        announce(
            self.client,
            tenant_id,
            workflow_id,
            status,
            final=final,
            expires_s=self.result_expires_s,
            only_new=only_new,
        )
