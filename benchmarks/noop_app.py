"""A bare Celery app with one no-op task: the floor every fleet number is compared to."""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "noop",
    broker=os.environ["ACTIONFLEET_BROKER_URL"],
    backend=os.environ["ACTIONFLEET_BROKER_URL"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    task_acks_late=True,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None
