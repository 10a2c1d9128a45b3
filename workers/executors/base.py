"""The executor interface: one executor per primitive."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from producer.models import Action
from workers.middleware import ActionContext
from workers.policy import Grant

__all__ = ["Executor"]


class Executor(Protocol):
    """Runs one primitive. ``execute`` returns the result's ``output`` or raises an
    ``ActionError``; it is called from worker threads and must be thread-safe."""

    primitive: ClassVar[str]

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]: ...

    def close(self) -> None: ...
