"""Executor registry: primitive name -> a factory building that primitive's executor.

Executors are built lazily, once per worker process (after the fork: a Docker client or a
browser must not be shared across processes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from producer.config import Settings
from workers.executors.base import Executor

__all__ = ["EXECUTOR_FACTORIES", "Executor", "ExecutorRegistry"]


def _code(settings: Settings) -> Executor:
    from sandboxes.docker import DockerSandbox
    from workers.executors.code import CodeExecutor

    return CodeExecutor(DockerSandbox(runtime=settings.sandbox_runtime))


EXECUTOR_FACTORIES: dict[str, Callable[[Settings], Executor]] = {"code": _code}


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
