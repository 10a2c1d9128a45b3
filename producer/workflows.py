"""Workflows as data: a chain of actions the fleet runs, advances and compensates itself.

A workflow is a list of steps. Each step is an action (``primitive`` + ``payload``) whose
values may reference earlier steps (``{"$ref": "steps.fetch.output.text"}``), an optional
condition on an earlier step's status (``when``), and an optional compensation action run,
in reverse order, when a later step fails. The producer signs and sends the whole
workflow once, to ``actions.workflow``; from then on the fleet owns it (state in Redis,
``workers.workflows``), so the producer may go away. Status is kept under the workflow's
own result key, which the producer's Redis user may read (docs/workflows.md).

Build one from JSON/YAML (``load_workflow``) or in Python::

    wf = (WorkflowBuilder("acme", "researcher-7", deadline_s=600)
          .step("write", "files", {"op": "write", "path": "in.txt", "content": "hi"},
                compensate=("files", {"op": "delete", "path": "in.txt"}))
          .step("count", "code", {"language": "python", "workspace": "ro",
                                  "source": "print(len(open('/workspace/in.txt').read()))"})
          .build())
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from producer.errors import ResultTimeout
from producer.models import PRIMITIVES, Ident, Primitive, ShortText
from producer.transport import WORKFLOW_QUEUE, task_id_for

__all__ = [
    "REF_KEY",
    "START_TASK",
    "TERMINAL_STATES",
    "WORKFLOW_QUEUE",
    "WORKFLOW_STATES",
    "StepCondition",
    "WorkflowBuilder",
    "WorkflowHandle",
    "WorkflowSpec",
    "WorkflowStep",
    "cancel_workflow",
    "load_workflow",
    "ref",
    "refs_in",
    "step_action_id",
    "submit_workflow",
]

START_TASK = "actionfleet.workflow"  # the engine's task for a producer's message
REF_KEY = "$ref"
MAX_STEPS = 50
# running -> succeeded | compensating -> failed | cancelled | timed_out (after compensation)
# refused: the fleet would not start it (bad signature, key or scope); nothing ran.
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "timed_out", "refused")
WORKFLOW_STATES = ("running", "compensating", *TERMINAL_STATES)
StepId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
_REF = re.compile(r"^steps\.([A-Za-z][A-Za-z0-9_-]{0,63})\.(status|output|error)(\.[^.]+)*$")
_NAMESPACE = uuid.UUID("0b8d4c63-5f0e-4a57-b0cb-2f8e3f6a1d27")
# What a step may set of the action envelope; the rest comes from the workflow.
_STEP_FIELDS = {"primitive", "payload", "labels", "priority", "on_limit"}


def ref(path: str) -> dict[str, str]:
    """A reference to an earlier step's result: ``steps.<id>.output.<field>…``,
    ``steps.<id>.status`` or ``steps.<id>.error.type``."""
    return {REF_KEY: path}


def refs_in(value: Any) -> list[str]:
    """Every ``$ref`` path inside ``value`` (dicts and lists, any depth)."""
    if isinstance(value, dict):
        if set(value) == {REF_KEY}:
            return [str(value[REF_KEY])]
        return [r for v in value.values() for r in refs_in(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs_in(v)]
    return []


def step_action_id(workflow_id: str, step_id: str, phase: str = "run") -> str:
    """The action id of a step (``phase`` ``run``) or of its compensation: the same in
    every delivery of the engine, so a re-send is the same task."""
    return str(uuid.uuid5(_NAMESPACE, f"{workflow_id}/{step_id}/{phase}"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepCondition(_Strict):
    """Run the step only when step ``step`` (an earlier one) ended with one of ``status``."""

    step: StepId
    status: list[str] = Field(default_factory=lambda: ["succeeded"], min_length=1, max_length=8)


class WorkflowStep(_Strict):
    id: StepId
    action: dict[str, Any] = Field(
        description="primitive + payload (+ labels, priority, on_limit); values may be "
        '{"$ref": "steps.<earlier id>.output.<field>"}'
    )
    when: StepCondition | None = None
    compensate: dict[str, Any] | None = Field(
        None, description="an action run when a later step fails; may $ref this step too"
    )

    @model_validator(mode="after")
    def _actions(self) -> WorkflowStep:
        for name, action in (("action", self.action), ("compensate", self.compensate)):
            if action is None:
                continue
            extra = set(action) - _STEP_FIELDS
            if extra:
                raise ValueError(
                    f"{name} may set only {sorted(_STEP_FIELDS)}; {sorted(extra)} come from "
                    "the workflow (tenant, agent) or the engine (ids, keys, deadline)"
                )
            if action.get("primitive") not in PRIMITIVES:
                raise ValueError(f"{name}.primitive must be one of {', '.join(PRIMITIVES)}")
            if not isinstance(action.get("payload"), dict):
                raise ValueError(f"{name}.payload must be an object")
        return self


class WorkflowSpec(_Strict):
    """A workflow as the producer sends it (and as ``workflow run FILE`` reads it)."""

    workflow_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: ShortText = ""
    tenant_id: Ident
    agent_id: Ident
    deadline_s: float | None = Field(
        None, gt=0, le=7 * 86_400, description="the whole workflow, from its start"
    )
    steps: list[WorkflowStep] = Field(min_length=1, max_length=MAX_STEPS)

    @model_validator(mode="after")
    def _references(self) -> WorkflowSpec:
        try:
            self.workflow_id = str(uuid.UUID(self.workflow_id))
        except ValueError:
            raise ValueError("workflow_id must be a UUID") from None
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice")
            if step.when is not None and step.when.step not in seen:
                raise ValueError(f"step {step.id!r}: when.step {step.when.step!r} is not earlier")
            for path in refs_in(step.action):
                _check_ref(step.id, path, seen)
            seen.add(step.id)  # a compensation may reference its own step
            for path in refs_in(step.compensate):
                _check_ref(step.id, path, seen)
        return self

    def primitives(self) -> set[Primitive]:
        out: set[Primitive] = set()
        for step in self.steps:
            out.add(step.action["primitive"])
            if step.compensate is not None:
                out.add(step.compensate["primitive"])
        return out


def _check_ref(step_id: str, path: str, earlier: set[str]) -> None:
    m = _REF.match(path)
    if m is None:
        raise ValueError(
            f"step {step_id!r}: $ref {path!r} is not steps.<id>.status|output|error[.field…]"
        )
    if m.group(1) not in earlier:
        raise ValueError(f"step {step_id!r}: $ref {path!r} names no earlier step")


class WorkflowBuilder:
    """Build a ``WorkflowSpec`` step by step (see the module docstring)."""

    def __init__(
        self,
        tenant_id: str,
        agent_id: str,
        *,
        name: str = "",
        deadline_s: float | None = None,
        workflow_id: str | None = None,
    ) -> None:
        self._data: dict[str, Any] = {
            "tenant_id": tenant_id,
            "agent_id": agent_id,
            "name": name,
            "deadline_s": deadline_s,
            "steps": [],
        }
        if workflow_id:
            self._data["workflow_id"] = workflow_id

    def step(
        self,
        step_id: str,
        primitive: str,
        payload: dict[str, Any],
        *,
        when: tuple[str, list[str]] | None = None,
        compensate: tuple[str, dict[str, Any]] | None = None,
    ) -> WorkflowBuilder:
        step: dict[str, Any] = {
            "id": step_id,
            "action": {"primitive": primitive, "payload": payload},
        }
        if when is not None:
            step["when"] = {"step": when[0], "status": when[1]}
        if compensate is not None:
            step["compensate"] = {"primitive": compensate[0], "payload": compensate[1]}
        self._data["steps"].append(step)
        return self

    def build(self) -> WorkflowSpec:
        return WorkflowSpec.model_validate(self._data)


def load_workflow(path: Path, **overrides: Any) -> WorkflowSpec:
    """A workflow from a JSON or YAML file (YAML needs PyYAML: the worker extras, or
    ``pip install pyyaml``). ``overrides`` replace top-level fields (tenant_id, …)."""
    text = path.read_text(encoding="utf-8")
    data: Any
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError(
                f"{path} is YAML and this install has no PyYAML: pip install pyyaml, or write "
                "the workflow as JSON"
            ) from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold one workflow object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return WorkflowSpec.model_validate(data)


Phase = Literal["run", "compensate"]


class _Client(Protocol):
    def send_signed(self, task: str, queue: str, message: dict[str, Any], task_id: str) -> None: ...

    def async_result(self, task_id: str) -> Any: ...


class WorkflowHandle:
    """A workflow the fleet runs: its status, kept under the workflow's own result key."""

    def __init__(self, client: _Client, tenant_id: str, workflow_id: str) -> None:
        self.tenant_id, self.workflow_id = tenant_id, workflow_id
        self._async = client.async_result(task_id_for(tenant_id, workflow_id))

    def status(self) -> dict[str, Any] | None:
        """The latest status (None: the fleet has not started it, or it expired)."""
        meta = self._async.backend.get_task_meta(self._async.id, cache=False)
        value = meta.get("result")
        return value if isinstance(value, dict) and "steps" in value else None

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> dict[str, Any]:
        """Wait until the workflow ended; its final status. Raises ``ResultTimeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status is not None and status["status"] in TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise ResultTimeout(
                    f"workflow {self.workflow_id} still {status and status['status']} after "
                    f"{timeout}s; it goes on in the fleet: actionfleet workflow status"
                )
            time.sleep(poll_s)


def submit_workflow(client: _Client, spec: WorkflowSpec) -> WorkflowHandle:
    """Sign and send ``spec`` to the fleet's workflow engine; returns at once."""
    message = {"op": "run", "workflow": spec.model_dump(mode="json")}
    task_id = task_id_for(spec.tenant_id, str(uuid.uuid4()))
    client.send_signed(START_TASK, WORKFLOW_QUEUE, message, task_id)
    return WorkflowHandle(client, spec.tenant_id, spec.workflow_id)


def cancel_workflow(client: _Client, tenant_id: str, workflow_id: str) -> WorkflowHandle:
    """Ask the engine to stop ``workflow_id`` and compensate what it did."""
    message = {"op": "cancel", "workflow_id": workflow_id, "tenant_id": tenant_id}
    client.send_signed(
        START_TASK, WORKFLOW_QUEUE, message, task_id_for(tenant_id, str(uuid.uuid4()))
    )
    return WorkflowHandle(client, tenant_id, workflow_id)
