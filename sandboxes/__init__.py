"""Isolated execution: the sandbox interface, the Docker backend (runc or gVisor), the image.

``sandboxes.base`` is dependency-free; the Docker parts import the ``docker`` SDK (the
``worker`` extra), so they are loaded lazily on first attribute access.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from sandboxes.base import Limits, RunOutcome, RunSpec, Sandbox, Usage

__all__ = [
    "DockerSandbox",
    "Limits",
    "RunOutcome",
    "RunSpec",
    "Sandbox",
    "Usage",
    "build_image",
    "ensure_image",
    "image_tag",
]

_LAZY = {
    "DockerSandbox": "sandboxes.docker",
    "build_image": "sandboxes.image",
    "ensure_image": "sandboxes.image",
    "image_tag": "sandboxes.image",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandboxes' has no attribute {name!r}")
    return getattr(import_module(module), name)
