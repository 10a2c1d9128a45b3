"""The workflow engine's Celery tasks, on ``actions.workflow``: the producer's signed
message (start or cancel) and the engine's own ``advance`` chain. Both acknowledge late,
so a worker killed mid-task has the message redelivered; both are idempotent."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from producer.workflows import WORKFLOW_QUEUE
from workers.config import Settings
from workers.reliability import guarantees_client
from workers.workflows.engine import ADVANCE_TASK, START_TASK, Engine

__all__ = ["register_workflow_tasks"]


def register_workflow_tasks(app: Celery, settings: Settings, broker_url: str) -> None:
    engine: list[Engine] = []
    lock = threading.Lock()

    def get() -> Engine:
        with lock:  # one per process, built after the fork
            if not engine:
                client = guarantees_client(settings, broker_url)
                engine.append(
                    Engine(
                        app,
                        client,
                        auth_required=settings.auth == "required",
                        skew_s=settings.auth_skew_s,
                        result_expires_s=settings.result_expires_s,
                    )
                )
            return engine[0]

    @app.task(name=START_TASK, ignore_result=True, acks_late=True)
    def workflow_message(message: dict[str, Any]) -> None:
        get().receive(message)

    @app.task(name=ADVANCE_TASK, ignore_result=True, acks_late=True)
    def workflow_advance(workflow_id: str, token: str, delay: float = 0.0) -> None:
        get().advance(workflow_id, token, delay)

    app.conf.task_routes = {
        **(app.conf.task_routes or {}),
        START_TASK: {"queue": WORKFLOW_QUEUE},
        ADVANCE_TASK: {"queue": WORKFLOW_QUEUE},
    }
