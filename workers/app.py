"""The Celery app: one task per primitive, each consumed from its own queue.

Start a worker with ``actionfleet worker --queues code`` or plain
``celery -A workers.app worker -Q actions.code``.

Delivery settings, and why:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after
  its action finished, so a worker process that dies mid-action (OOM, SIGKILL) sends the
  action back to the queue instead of losing it.
- ``worker_prefetch_multiplier=1``: actions run for seconds; prefetching more would park
  actions behind a busy process while other workers idle.
- ``visibility_timeout`` (broker transport option): unacked actions of a dead worker *host*
  reappear after it; it must exceed the longest action (checked at start-up).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Celery, Task, signals
from kombu import Queue

from producer.config import get_settings
from producer.models import PRIMITIVES, queue_for, task_name_for
from producer.transport import celery_conf
from workers.executors import ExecutorRegistry
from workers.middleware import ActionContext, LogMiddleware
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine

__all__ = ["app", "get_pipeline"]

log = logging.getLogger(__name__)
settings = get_settings()
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

app = Celery("actionfleet")
app.conf.update(celery_conf(settings, settings.resolved_broker_url() or DEFAULT_BROKER))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    task_queues=[Queue(queue_for(p)) for p in PRIMITIVES],
    task_routes={task_name_for(p): {"queue": queue_for(p)} for p in PRIMITIVES},
    # Backstop only: the sandbox enforces each action's own timeout far earlier.
    task_time_limit=max(60, settings.visibility_timeout_s - 30),
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
)

_pipeline: Pipeline | None = None
_pipeline_lock = threading.Lock()


def get_pipeline() -> Pipeline:
    """The pipeline of this worker process, built on first use (after the fork)."""
    global _pipeline
    with _pipeline_lock:
        if _pipeline is None:
            from audit.config import audit_settings
            from audit.emitter import AuditMiddleware

            a = audit_settings(settings)
            audit = AuditMiddleware(
                settings.resolved_broker_url() or DEFAULT_BROKER,
                stream=a.stream,
                spool_dir=a.resolved_spool_dir,
                sensitive_fields=a.sensitive_fields,
                preview_bytes=a.preview_bytes,
            )
            policy = PolicyEngine(settings.policy)
            _pipeline = Pipeline(policy, ExecutorRegistry(settings), [LogMiddleware(), audit])
        return _pipeline


def _attempt(task: Task) -> int:
    delivery = task.request.delivery_info or {}
    return task.request.retries + 1 + (1 if delivery.get("redelivered") else 0)


def _make_task(primitive: str) -> Any:
    @app.task(name=task_name_for(primitive), bind=True)
    def run_action(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        ctx = ActionContext(
            primitive=primitive,
            queue=queue_for(primitive),
            worker=self.request.hostname or f"{socket.gethostname()}:{os.getpid()}",
            attempt=_attempt(self),
            raw=message,
        )
        return get_pipeline().run(ctx)

    return run_action


TASKS = {p: _make_task(p) for p in PRIMITIVES}


@signals.worker_process_shutdown.connect
def _close_pipeline(**_: Any) -> None:
    global _pipeline
    if _pipeline is not None:
        _pipeline.close()
        _pipeline = None


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # A new pool process often replaces one that died mid-action: clear its containers.
    if _consumes_code:
        threading.Thread(target=_reap_once, name="sandbox-reaper", daemon=True).start()


_consumes_code = False


@signals.celeryd_init.connect
def _on_init(sender: Any = None, instance: Any = None, options: Any = None, **_: Any) -> None:
    global _consumes_code
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    _consumes_code = not queues or queue_for("code") in queues


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    # Fail loudly on a policy file that does not load, instead of on the first action.
    policy = PolicyEngine(settings.policy).current()
    tenants = [policy.default] + [policy.for_tenant(t) for t in policy.tenants]
    longest = max(t.code.max_timeout_s for t in tenants)
    if longest + 30 > settings.visibility_timeout_s:
        log.error(
            "visibility timeout %ss is not above the longest allowed action (%ss) plus 30s: "
            "a slow action may be delivered twice; raise ACTIONFLEET_VISIBILITY_TIMEOUT_S",
            settings.visibility_timeout_s,
            longest,
        )
    if _consumes_code:
        threading.Thread(target=_reap_loop, name="sandbox-reaper", daemon=True).start()


def _reap_once() -> None:
    """Remove sandbox containers left behind by dead workers or past their expiry."""
    from sandboxes.docker import DockerSandbox

    try:
        sandbox = DockerSandbox(runtime=settings.sandbox_runtime)
        try:
            removed = sandbox.reap()
        finally:
            sandbox.close()
        if removed:
            log.warning("reaped %d leftover sandbox containers", removed)
    except Exception:
        log.exception("sandbox reaper failed; will retry")


def _reap_loop(interval_s: float = 60.0) -> None:
    while True:
        _reap_once()
        time.sleep(interval_s)
