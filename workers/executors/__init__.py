"""Executor registry: primitive name -> a factory building that primitive's executor.

Executors are built lazily, once per worker process (after the fork: a Docker client or a
browser must not be shared across processes). One module per primitive, each with one
executor behind ``base.Executor``. May import ``producer``, ``sandboxes``, ``audit.redact``
and the worker packages below it (``browser``, ``policy``, ``guarantees``, ``outbound``,
``workspace``, ``middleware``, ``config``); never ``pipeline``, ``app`` or ``ops``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from workers.config import Settings
from workers.executors.base import Executor

__all__ = ["EXECUTOR_FACTORIES", "Executor", "ExecutorRegistry"]


def _code(settings: Settings) -> Executor:
    if settings.test_probe_executor:  # TEST ONLY: see workers/executors/probe.py
        from workers.executors.probe import ReliabilityProbeExecutor

        return ReliabilityProbeExecutor(settings.test_probe_dir or settings.home / "probe")
    from sandboxes import open_backend
    from sandboxes.base import Limits
    from workers.executors.code import CodeExecutor
    from workers.workspace.tenant import Workspaces

    workspaces = Workspaces(settings.resolved_workspace_root())
    sandbox = open_backend(settings)
    if settings.sandbox_pool_size == 0:
        return CodeExecutor(sandbox, workspaces)
    from sandboxes.pool import PooledSandbox
    from workers.policy import PolicyEngine

    # The default tenant's default limits are what most actions run with: keep that profile
    # warm from the start; others are warmed once they are asked for.
    code = PolicyEngine(settings.policy).current().default.code
    default = Limits(
        memory_mb=code.default_memory_mb,
        cpus=code.default_cpus,
        pids=code.pids,
        tmpfs_mb=code.tmpfs_mb,
    )
    pooled = PooledSandbox(
        sandbox,
        max_per_profile=settings.sandbox_pool_size,
        max_memory_mb=settings.sandbox_pool_max_memory_mb,
        ttl_s=settings.sandbox_pool_ttl_s,
        prewarm=(default,),
    )
    return CodeExecutor(pooled, workspaces)


def _files(settings: Settings) -> Executor:
    from workers.executors.files import FilesExecutor
    from workers.workspace.tenant import Workspaces

    return FilesExecutor(Workspaces(settings.resolved_workspace_root()))


def _api(settings: Settings) -> Executor:
    from workers.executors.api import ApiExecutor
    from workers.outbound.secrets import build_secret_store

    return ApiExecutor(build_secret_store(settings.secrets_dir))


def _email(settings: Settings) -> Executor:
    from workers.executors.email import EmailExecutor, RelayConfig
    from workers.guarantees.outbox import Outbox
    from workers.outbound.secrets import build_secret_store
    from workers.workspace.tenant import Workspaces

    # The outbox lives on the broker: every worker of the fleet already shares it.
    broker = settings.resolved_broker_url() or "redis://127.0.0.1:6379/0"
    return EmailExecutor(
        RelayConfig.from_settings(settings),
        build_secret_store(settings.secrets_dir),
        Outbox(broker, ttl_s=settings.email_outbox_ttl_s),
        Workspaces(settings.resolved_workspace_root()),
    )


def _browse(settings: Settings) -> Executor:
    from workers.executors.browse import BrowseExecutor
    from workers.outbound.secrets import build_secret_store
    from workers.workspace.tenant import Workspaces

    return BrowseExecutor(
        executable=settings.browser_executable,
        workspaces=Workspaces(settings.resolved_workspace_root()),
        secrets=build_secret_store(settings.secrets_dir),
    )


EXECUTOR_FACTORIES: dict[str, Callable[[Settings], Executor]] = {
    "code": _code,
    "browse": _browse,
    "api": _api,
    "email": _email,
}
EXECUTOR_FACTORIES["files"] = _files


class ExecutorRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._built: dict[str, Executor] = {}

    def supports(self, primitive: str) -> bool:
        return primitive in EXECUTOR_FACTORIES

    def get(self, primitive: str) -> Executor:
        with self._lock:
            if primitive not in self._built:
                self._built[primitive] = EXECUTOR_FACTORIES[primitive](self.settings)
            return self._built[primitive]

    def close(self) -> None:
        with self._lock:
            for executor in self._built.values():
                executor.close()
            self._built.clear()
