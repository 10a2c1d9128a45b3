"""Isolated execution: the sandbox interface, the Docker backend (runc or gVisor), the runc
backend (the same containers without the engine on the path), the warm pool, the image.

``sandboxes.base`` is dependency-free; the backends import the ``docker`` SDK (the
``worker`` extra), so they are loaded lazily on first attribute access. Imports ``producer``
only (errors, and nothing of the worker side).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from sandboxes.base import Limits, RunOutcome, RunSpec, Sandbox, Usage, WarmBackend

if TYPE_CHECKING:
    from sandboxes.config import SandboxSettings

__all__ = [
    "DockerSandbox",
    "Limits",
    "PooledSandbox",
    "RunOutcome",
    "RunSpec",
    "RuncSandbox",
    "Sandbox",
    "Usage",
    "WarmBackend",
    "build_image",
    "ensure_image",
    "image_tag",
    "open_backend",
]

_LAZY = {
    "DockerSandbox": "sandboxes.docker",
    "PooledSandbox": "sandboxes.pool",
    "RuncSandbox": "sandboxes.runc",
    "build_image": "sandboxes.image",
    "ensure_image": "sandboxes.image",
    "image_tag": "sandboxes.image",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandboxes' has no attribute {name!r}")
    return getattr(import_module(module), name)


def open_backend(settings: SandboxSettings) -> WarmBackend:
    """The backend the settings name (``sandbox_backend``), with its runtime."""
    if settings.sandbox_backend == "runc":
        from sandboxes.runc import RuncSandbox

        return RuncSandbox(image=settings.sandbox_image, directory=settings.sandbox_runc_dir)
    from sandboxes.docker import DockerSandbox

    return DockerSandbox(runtime=settings.sandbox_runtime, image=settings.sandbox_image)
