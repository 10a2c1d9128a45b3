"""Sandbox settings from ``ACTIONFLEET_SANDBOX_*`` (and the image's Debian mirror)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SandboxSettings", "sandbox_settings"]


class SandboxSettings(BaseSettings):
    """Which backend runs sandboxes, with which runtime and image, and the warm pool."""

    model_config = SettingsConfigDict(env_prefix="ACTIONFLEET_", extra="ignore")

    sandbox_backend: Literal["docker", "runc"] = Field(
        "docker",
        description="docker: containers through the engine; runc: the same containers run "
        "by runc directly (root, no dockerd on the path; runtime runc only)",
    )
    sandbox_runtime: Literal["runc", "runsc"] = Field("runc", description="OCI runtime")
    sandbox_runc_dir: Path = Field(
        Path("/var/lib/actionfleet/runc"),
        description="runc backend: image templates and per-container bundles",
    )
    sandbox_image: str | None = Field(None, description="override the built sandbox image tag")
    debian_mirror: str = Field("http://deb.debian.org/debian", description="for sandbox build")
    sandbox_pool_size: int = Field(
        4, ge=0, le=64, description="warm containers per profile per worker process; 0: no pool"
    )
    sandbox_pool_max_memory_mb: int = Field(
        2048, ge=0, description="cap on the summed memory limits of one process's warm pool"
    )
    sandbox_pool_ttl_s: float = Field(
        600.0, ge=60, description="expiry label of a warm container; retired at half of it"
    )

    @model_validator(mode="after")
    def _backend_runtime(self) -> SandboxSettings:
        if self.sandbox_backend == "runc" and self.sandbox_runtime != "runc":
            raise ValueError(
                "sandbox_backend 'runc' runs runc only: set ACTIONFLEET_SANDBOX_RUNTIME=runc, "
                "or ACTIONFLEET_SANDBOX_BACKEND=docker for gVisor (runsc)"
            )
        return self


@lru_cache(maxsize=1)
def sandbox_settings() -> SandboxSettings:
    return SandboxSettings()
