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
- Broker loss: the worker retries the connection forever (``broker_connection_max_retries
  =None``) and resumes consuming; Redis sockets time out and are health-checked so a
  half-open connection after a Redis restart is noticed instead of hanging.
- Re-queues (deferral over a limit, retry after a retryable failure) are
  ``Task.retry(countdown=...)``: the same message under the same task id, so the agent's
  handle gets the final result. docs/reliability.md has the details and the traps.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, Task, signals
from celery.app import trace as celery_trace
from celery.exceptions import Ignore, Reject, Retry

from producer.models import PRIMITIVES, queue_for, task_name_for
from producer.transport import AWAITING_APPROVAL_STATE, celery_conf, kwargs_repr
from workers.auth.verify import Authenticator
from workers.celery import affinity
from workers.celery.backend import FleetRedisBackend, run_riders, take_riders
from workers.celery.broker import install_transport
from workers.config import get_settings
from workers.executors import ExecutorRegistry
from workers.governance.approvals import ApprovalStore, send_message
from workers.governance.gate import ApprovalGate
from workers.middleware import ActionContext, LogMiddleware
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine
from workers.reliability import Reliability, RetryState
from workers.workflows.tasks import register_workflow_tasks

__all__ = ["app", "get_pipeline"]

log = logging.getLogger(__name__)
settings = get_settings()
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

app = Celery("actionfleet")
app.conf.update(celery_conf(settings, settings.resolved_broker_url() or DEFAULT_BROKER))
if urlsplit(app.conf.result_backend).scheme in ("redis", "rediss"):
    # One round trip stores the result and the pipeline's settle writes (workers/celery/backend.py).
    app.backend_cls = FleetRedisBackend
# A fetch that records the message as unacked in the same step (workers/celery/broker.py).
install_transport()
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,
    worker_prefetch_multiplier=1,
    # On a broker connection loss Celery can cancel running actions (True), which writes
    # a "terminated" failure the agent reads as the final result, and runs the action
    # again on redelivery. Letting them finish is better here: the result reaches the
    # backend, and the late redelivery of the unacked message is answered from the
    # idempotency record instead of running again (docs/reliability.md).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_routes={task_name_for(p): {"queue": queue_for(p)} for p in PRIMITIVES},
    # Backstop only: the sandbox enforces each action's own timeout far earlier.
    task_time_limit=max(60, settings.visibility_timeout_s - 30),
    # Off unless asked for: Flower enables them by broadcast while it runs (config.py).
    worker_send_task_events=settings.task_events,
    task_send_sent_event=settings.task_events,
    worker_hijack_root_logger=False,
    # Survive a broker restart: reconnect forever, notice dead sockets (docs/reliability.md).
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    redis_socket_timeout=30.0,
    redis_socket_connect_timeout=10.0,
    redis_retry_on_timeout=True,
    redis_socket_keepalive=True,
    redis_backend_health_check_interval=10,
    # Storing a result must outlast a Redis restart: without this, one failed read inside
    # the store marks a SUCCEEDED action as FAILED(ConnectionError) and acks it.
    result_backend_always_retry=True,
    result_backend_max_retries=60,
    result_backend_max_sleep_between_retries_ms=2_000,
)
app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "socket_timeout": 30.0,
    "socket_connect_timeout": 10.0,
    "socket_keepalive": True,
    "health_check_interval": 10,
    "retry_on_timeout": True,
}

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
                linger_s=a.linger_s,
            )
            policy = PolicyEngine(settings.policy)
            broker = settings.resolved_broker_url() or DEFAULT_BROKER
            reliability = Reliability.from_settings(settings, broker)
            # Settle writes ride with the stored result when both live on one Redis.
            reliability.defer_settle = (
                isinstance(app.backend, FleetRedisBackend)
                and (settings.limits_redis_url or broker) == app.conf.result_backend
            )
            auth = Authenticator(
                reliability.client,
                required=settings.auth == "required",
                skew_s=settings.auth_skew_s,
                nonce_ttl_s=settings.idempotency_retention_s,
                cache_s=settings.auth_cache_s,
            )
            gate = ApprovalGate(
                approval_store(reliability.client), nonce_ttl_s=settings.idempotency_retention_s
            )
            _pipeline = Pipeline(
                policy,
                ExecutorRegistry(settings),
                [LogMiddleware(), audit],
                reliability,
                auth,
                gate,
            )
        return _pipeline


def approval_store(client: Any) -> ApprovalStore:
    return ApprovalStore(
        client,
        retention_s=settings.approval_retention_s,
        redispatch_s=settings.approval_redispatch_s,
    )


def _attempt(task: Task, state: RetryState) -> int:
    # Failed attempts so far (deferrals over a limit are not attempts), plus this one.
    delivery = task.request.delivery_info or {}
    return len(state.attempts) + 1 + (1 if delivery.get("redelivered") else 0)


_celery_saferepr = celery_trace.saferepr


def result_repr(result: Any, maxlen: int | None = None, *args: Any, **kwargs: Any) -> str:
    """What Celery shows of a task's result in its success log line and task events
    (Flower): for an action, its id, primitive and status -- never its output, which
    would land in logs unredacted. Celery builds it for every task, logged or not, by
    walking the result token by token (~30-60 us); this is one f-string."""
    if type(result) is dict and "action_id" in result:
        return (
            f"{{'action_id': {result['action_id']!r}, 'primitive': {result.get('primitive')!r}"
            f", 'status': {result.get('status')!r}, ...}}"
        )
    return _celery_saferepr(result, maxlen, *args, **kwargs)


celery_trace.saferepr = result_repr  # the one name trace_task formats the result with


def _make_task(primitive: str) -> Any:
    # resultrepr_maxsize: for results that are not an action's (result_repr).
    @app.task(name=task_name_for(primitive), bind=True, resultrepr_maxsize=110)
    def run_action(
        self: Task, message: dict[str, Any], retry_state: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        state = RetryState.from_dict(retry_state)
        ctx = ActionContext(
            primitive=primitive,
            queue=queue_for(primitive),
            worker=self.request.hostname or f"{socket.gethostname()}:{os.getpid()}",
            attempt=_attempt(self, state),
            raw=message,
            extra={"retry_state": state},
            task_id=self.request.id,
        )
        result = get_pipeline().run(ctx)
        if not ctx.store_result:
            raise Ignore()  # acknowledged and audited; nothing stored under a foreign id
        if ctx.awaiting_approval:
            # Not final (not a ready state): the handle returns it at once, and the
            # decided run's result replaces it under this same task id.
            self.update_state(state=AWAITING_APPROVAL_STATE, meta=result)
            raise Ignore()
        if ctx.reschedule is None:
            return result
        try:
            # Same message, same task id: the agent's handle waits for the final result.
            raise self.retry(
                kwargs={"message": message, "retry_state": ctx.reschedule.state},
                countdown=ctx.reschedule.countdown_s,
                max_retries=None,
                argsrepr="()",
                kwargsrepr=self.request.kwargsrepr
                or kwargs_repr(primitive, ctx.action_id or "?", str(message.get("tenant_id"))),
            )
        except Retry:
            raise
        except Exception as exc:
            # Could not publish the re-queue (broker away): hand the delivery back rather
            # than acknowledge it, or the action would be lost.
            log.warning("re-queue of %s failed (%s); rejecting with requeue", self.request.id, exc)
            raise Reject(exc, requeue=True) from exc

    return run_action


TASKS = {p: _make_task(p) for p in PRIMITIVES}
# Workflows: the engine's tasks on actions.workflow (workers/workflows, docs/workflows.md).
register_workflow_tasks(app, settings, settings.resolved_broker_url() or DEFAULT_BROKER)


@signals.task_postrun.connect
def _run_leftover_riders(**_: Any) -> None:
    # Settle writes meant to ride with the result, when the task stored none (it rejected
    # the message back to the queue): run them now, never with the next task's result.
    riders = take_riders()
    if riders:
        try:
            run_riders(app.backend.client, riders)
        except Exception:  # leases lapse on their own; the claim expires with its lease
            log.exception("could not run %d settle writes", len(riders))


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect  # the solo pool runs actions in the main process
def _close_pipeline(**_: Any) -> None:
    global _pipeline
    if _pipeline is not None:
        _pipeline.close()
        _pipeline = None


@signals.worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    if _pool_cpus:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
        if index is not None:
            cpu = affinity.pin_pool_process(_pool_cpus, index)
            log.info("pool process %s pinned to CPU %s", index, cpu)
    # A new pool process often replaces one that died mid-action: clear its containers.
    if _consumes_code:
        threading.Thread(target=_reap_once, name="sandbox-reaper", daemon=True).start()


_consumes_code = False
_pool_cpus: tuple[int, ...] | None = None  # set before the pool forks; its processes read it


@signals.celeryd_init.connect
def _on_init(sender: Any = None, instance: Any = None, options: Any = None, **_: Any) -> None:
    global _consumes_code, _pool_cpus
    options = options or {}
    if settings.worker_cpus:  # before the pool starts: its processes inherit the set
        try:
            cpus = affinity.pin(settings.worker_cpus)
        except affinity.CpuSpecError as exc:
            raise SystemExit(f"error: ACTIONFLEET_WORKER_CPUS: {exc}") from None
        log.info("worker pinned to CPUs %s", ",".join(map(str, cpus)))
        # Celery's default concurrency is the machine's CPU count.
        processes = int(options.get("concurrency") or 0) or os.cpu_count() or 1
        _pool_cpus = affinity.pool_cpus(cpus, processes)
    queues = options.get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    # The reliability probe (tests) serves `code` without containers: nothing to reap.
    consumes = not queues or queue_for("code") in queues
    _consumes_code = consumes and not settings.test_probe_executor


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    if settings.auth == "off":
        log.warning(
            "ACTIONFLEET_AUTH=off: actions are not authenticated; anyone who can reach the "
            "broker may act as any tenant. Use it on a single-user machine only "
            "(docs/security.md)"
        )
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
    threading.Thread(target=_approvals_loop, name="approval-sweep", daemon=True).start()


def _approvals_loop() -> None:
    """Expire approvals past their timeout and send decided messages no worker took
    (workers/governance/approvals.py); every worker sweeps, the scripts make it safe."""
    import redis

    url = settings.limits_redis_url or settings.resolved_broker_url() or DEFAULT_BROKER
    store = approval_store(redis.Redis.from_url(url, socket_timeout=10))
    while True:
        try:
            for message in store.sweep():
                send_message(app, message)
        except Exception:
            log.exception("approval sweep failed; will retry")
        time.sleep(settings.approval_sweep_s)


def _reap_once() -> None:
    """Remove sandbox containers left behind by dead workers or past their expiry."""
    from sandboxes import open_backend

    try:
        sandbox = open_backend(settings)
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
