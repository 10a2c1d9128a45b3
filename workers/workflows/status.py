"""A workflow's status as producers see it, and how it reaches them.

The status is stored under the workflow's own Celery result key (a producer's Redis user
may read its tenant's) and announced on that key's channel, so ``WorkflowHandle.wait``
waits on it as on any action's result: ``STARTED`` while it runs, ``SUCCESS`` once final.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis
from celery import states

from producer.transport import RESULT_KEY_PREFIX, task_id_for
from producer.workflows import step_action_id
from workers.workflows.state import WorkflowState

__all__ = ["announce", "iso", "status_of"]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _pending(state: WorkflowState, step: str) -> str:
    return "running" if state.sent(step, "run") else "pending"


def status_of(state: WorkflowState) -> dict[str, Any]:
    """What ``actionfleet workflow status`` shows."""
    spec = state.spec
    steps = []
    for step in spec.steps:
        result = state.result(step.id)
        row: dict[str, Any] = {
            "id": step.id,
            "primitive": step.action["primitive"],
            "status": result["status"] if result else _pending(state, step.id),
            "action_id": step_action_id(spec.workflow_id, step.id),
        }
        if result and result.get("error"):
            row["error"] = result["error"]
        comp = state.result(step.id, "compensate")
        if comp is not None or state.sent(step.id, "compensate"):
            row["compensation"] = {
                "status": comp["status"] if comp else "running",
                "action_id": step_action_id(spec.workflow_id, step.id, "compensate"),
            }
        steps.append(row)
    return {
        "workflow_id": spec.workflow_id,
        "name": spec.name,
        "tenant_id": spec.tenant_id,
        "agent_id": spec.agent_id,
        "key_id": state.get("key_id") or None,
        "status": state.status,
        "reason": state.get("reason") or None,
        "created_at": state.get("created_at"),
        "finished_at": state.get("finished_at") or None,
        "steps": steps,
    }


def announce(
    client: redis.Redis,
    tenant_id: str,
    workflow_id: str,
    status: dict[str, Any],
    *,
    final: bool,
    expires_s: int,
    only_new: bool = False,
) -> None:
    """Store ``status`` under the workflow's result key and publish it on its channel:
    ready (``SUCCESS``) once final. ``only_new``: not over a status already there."""
    task_id = task_id_for(tenant_id, workflow_id)
    meta = {
        "status": states.SUCCESS if final else states.STARTED,
        "result": status,
        "traceback": None,
        "children": [],
        "date_done": iso(time.time()),
        "task_id": task_id,
    }
    key, body = f"{RESULT_KEY_PREFIX}{task_id}", json.dumps(meta)
    if client.set(key, body, ex=expires_s, nx=only_new):
        client.publish(key, body)
