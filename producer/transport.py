"""Celery settings shared by the producer SDK and the workers.

Both sides must agree on serialization and on how priorities map onto Redis lists, so
they are defined once here.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend
from kombu import Exchange, Queue

from producer.config import ProducerSettings

__all__ = [
    "AWAITING_APPROVAL_STATE",
    "REDIS_PRIORITY_SEP",
    "REDIS_PRIORITY_STEPS",
    "RESULT_KEY_PREFIX",
    "WORKFLOW_QUEUE",
    "LazyWatchRedisBackend",
    "action_queues",
    "celery_conf",
    "kwargs_repr",
    "redis_priority",
    "redis_queue_key",
    "redis_queue_keys",
    "task_id_for",
]

# The workflow engine's queue (producer/workflows.py, workers/workflows).
WORKFLOW_QUEUE = "actions.workflow"

# Celery's Redis result backend keeps a task's result at this prefix + task id (and
# announces it on a channel of the same name).
RESULT_KEY_PREFIX = "celery-task-meta-"
# The Celery state of an action parked for approval: not a ready state, so the decided
# run's result (SUCCESS) replaces it under the same task id, and the handle sees both.
AWAITING_APPROVAL_STATE = "AWAITING_APPROVAL"


def task_id_for(tenant_id: str, action_id: str) -> str:
    """The Celery task id of an action: its tenant, ``+``, its id. Results are then kept
    under a tenant's own key prefix, which a Redis ACL can grant to that tenant's producers
    alone (``+`` cannot occur in a tenant id, so no tenant's prefix covers another's)."""
    return f"{tenant_id}+{action_id}"


# Redis has no native priorities: kombu keeps one list per step and, by default, serves
# the LOWEST number first. Our contract says 9 is most urgent, so we invert on send.
REDIS_PRIORITY_STEPS = list(range(10))
# kombu names the list of priority step N "<queue><SEP><N>" (step 0 is the bare name).
REDIS_PRIORITY_SEP = "\x06\x16"


def redis_priority(priority: int) -> int:
    return 9 - priority


def redis_queue_key(queue: str, step: int) -> str:
    """The Redis list of ``queue``'s messages at kombu priority ``step`` (0-9, clamped)."""
    step = max(REDIS_PRIORITY_STEPS[0], min(REDIS_PRIORITY_STEPS[-1], step))
    return f"{queue}{REDIS_PRIORITY_SEP}{step}" if step else queue


def redis_queue_keys(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s messages, one per priority step."""
    return [redis_queue_key(queue, s) for s in REDIS_PRIORITY_STEPS]


def kwargs_repr(primitive: str, action_id: str, tenant_id: str) -> str:
    """What Celery shows of a task's arguments (message headers, Flower, worker logs).

    Celery would otherwise walk the whole message to build a ``repr`` on every send:
    that cost ~0.4 ms per action, and it copied payloads (email bodies, API bodies) into
    headers and dashboards where no redaction applies.
    """
    return f"{{'message': <{primitive} action {action_id} of tenant {tenant_id}>}}"


def action_queues() -> list[Queue]:
    """One direct exchange per queue, named like it. A bare ``Queue(name)`` would inherit
    the default exchange and routing key, binding every primitive's queue to the same key,
    so one code action would be delivered to every primitive's queue."""
    from producer.models import PRIMITIVES, queue_for

    names = [queue_for(p) for p in PRIMITIVES] + [WORKFLOW_QUEUE]
    return [Queue(n, Exchange(n, type="direct"), routing_key=n) for n in names]


def celery_conf(settings: ProducerSettings, broker_url: str) -> dict[str, Any]:
    backend = settings.result_backend or broker_url
    return {
        "broker_url": broker_url,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_expires_s,
        "result_extended": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Unacked actions return to the queue after this; must exceed the longest
            # action or a slow action is executed twice.
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu sweeps for such actions only every interval x throttle seconds (100 s
            # by default, on top of the timeout); sweep at a quarter of the timeout instead.
            "unacked_restore_interval": max(1, min(60, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # A sweeper SIGKILLed mid-sweep keeps its lock this long, blocking every
            # other sweep (kombu's default is 300 s). Two sweeps at once are harmless:
            # each message is restored in a WATCH transaction on the unacked hash.
            "unacked_mutex_expire": max(5, min(60, settings.visibility_timeout_s // 4)),
            "priority_steps": REDIS_PRIORITY_STEPS,
            "queue_order_strategy": "priority",
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 5.0}},
        "task_default_queue": "actions.code",
        "task_queues": action_queues(),
        "task_create_missing_queues": True,
    }


class LazyWatchRedisBackend(RedisBackend):
    """The producer's result backend: it subscribes to an action's result channel when
    someone waits for the result (``AsyncResult.get`` subscribes, then reads the stored
    result), not when the action is sent. Celery's own subscribes at every send: a batch
    of 100,000 actions then costs 100,000 subscriptions, and every result is pushed to
    a socket nobody may read (docs/batch.md)."""

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        # As ``app.backend_cls`` Celery passes no URL: take the configured one.
        app = kwargs.get("app")
        if url is None and app is not None:
            url = app.conf.result_backend
        super().__init__(*args, url=url, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None
