"""A workflow's durable state: one Redis hash per workflow, and a lock per workflow.

``af:wf:<id>`` holds the spec, the verified key id, the status, the phase (``run`` or
``compensate``), the deadline, the advancing chain's token, and per step its result
(``r:<step>``), its compensation's result (``c:<step>``) and whether it was sent
(``s:<step>:<phase>``). Every write is one HSET, so a worker killed between two writes
leaves a state the next ``advance`` continues from. ``af:wf:<id>:lock`` keeps two
deliveries from advancing one workflow at once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from producer.workflows import TERMINAL_STATES, WorkflowSpec

__all__ = ["TERMINAL", "WorkflowLock", "WorkflowState", "WorkflowStore"]

PREFIX = "af:wf"
TERMINAL = frozenset(TERMINAL_STATES)
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"


@dataclass
class WorkflowState:
    spec: WorkflowSpec
    fields: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)

    @property
    def status(self) -> str:
        return self.get("status")

    @property
    def phase(self) -> str:
        return self.get("phase", "run")

    def result(self, step: str, phase: str = "run") -> dict[str, Any] | None:
        raw = self.fields.get(f"{'r' if phase == 'run' else 'c'}:{step}")
        return None if raw is None else json.loads(raw)

    def results(self) -> dict[str, dict[str, Any]]:
        """Run results by step id: what ``$ref`` and ``when`` see."""
        return {s.id: r for s in self.spec.steps if (r := self.result(s.id)) is not None}

    def sent(self, step: str, phase: str) -> bool:
        return f"s:{step}:{phase}" in self.fields


class WorkflowStore:
    def __init__(self, client: redis.Redis, retention_s: int = 7 * 86_400) -> None:
        self.client = client
        self.retention_s = retention_s
        self._unlock = client.register_script(_UNLOCK)

    @staticmethod
    def key(workflow_id: str) -> str:
        return f"{PREFIX}:{workflow_id}"

    def create(self, spec: WorkflowSpec, fields: dict[str, str]) -> bool:
        """False when the workflow exists already (a redelivered or replayed start)."""
        key = self.key(spec.workflow_id)
        if not self.client.hsetnx(key, "spec", spec.model_dump_json()):
            return False
        self.client.hset(key, mapping=fields)
        self.client.expire(key, self.retention_s)
        return True

    def load(self, workflow_id: str) -> WorkflowState | None:
        raw = self.client.hgetall(self.key(workflow_id))
        if not raw or b"spec" not in raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return WorkflowState(WorkflowSpec.model_validate_json(fields["spec"]), fields)

    def update(self, state: WorkflowState, **fields: str) -> None:
        state.fields.update(fields)
        self.client.hset(self.key(state.spec.workflow_id), mapping=fields)

    def lock(self, workflow_id: str, ttl_s: float = 60.0) -> WorkflowLock | None:
        token = uuid.uuid4().hex
        key = f"{self.key(workflow_id)}:lock"
        if not self.client.set(key, token, nx=True, px=int(ttl_s * 1000)):
            return None
        return WorkflowLock(self, key, token)


@dataclass
class WorkflowLock:
    store: WorkflowStore
    key: str
    token: str

    def release(self) -> None:
        self.store._unlock(keys=[self.key], args=[self.token])
