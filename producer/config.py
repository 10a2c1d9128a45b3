"""Typed configuration from ``ACTIONFLEET_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Every knob of ActionFleet. Each field reads ``ACTIONFLEET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ACTIONFLEET_", extra="ignore")

    home: Path = Field(Path(".actionfleet"), description="state dir: fleet.json, logs, caches")
    broker_url: str | None = Field(None, description="redis:// URL; default: the running fleet's")
    result_backend: str | None = Field(None, description="default: same as broker_url")
    result_expires_s: int = Field(86_400, ge=60, description="how long results are kept")
    visibility_timeout_s: int = Field(
        3_600, ge=5, description="unacked actions are redelivered after this; > longest action"
    )
    policy: Path | None = Field(None, description="YAML policy file; default: built-in profile")
    clickhouse_dsn: str = Field("", description="chdb:///path or http(s)://host:8123")

    audit_stream: str = Field("actionfleet:audit", description="Redis stream of audit events")
    audit_retention_days: int = Field(365, ge=1, description="ClickHouse TTL of audit rows")
    audit_batch_size: int = Field(10_000, ge=1, description="ingester flushes at this many")
    audit_batch_age_s: float = Field(1.0, gt=0, description="... or when a batch is this old")
    audit_claim_idle_s: float = Field(60.0, gt=0, description="claim a dead ingester's entries")
    audit_preview_bytes: int = Field(4_096, ge=0, description="cap of input/output previews")
    audit_linger_s: float = Field(
        0.1, gt=0, le=60, description="a worker batches its events this long before one XADD"
    )
    audit_sensitive_fields: str = Field(
        "password,passwd,authorization,token,secret,api_key,apikey,cookie,private_key,credentials",
        description="comma-separated field names whose values are never written",
    )
    audit_spool_dir: Path | None = Field(None, description="default: <home>/audit-spool")

    worker_cpus: str | None = Field(
        None,
        description="pin the worker to these CPUs, e.g. 0, 0-3 or 0,2 (worker --cpus)",
    )
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

    # Operations (workers/metrics.py, workers/flower.py). Port 0: a free port (`up`).
    metrics_host: str = Field("127.0.0.1", description="bind address of /metrics")
    metrics_port: int = Field(0, ge=0, le=65535, description="port of /metrics; 0: free port")
    flower_host: str = Field("127.0.0.1", description="bind address of Flower")
    flower_port: int = Field(0, ge=0, le=65535, description="Flower port; 0: free port")
    flower_user: str = Field("admin", min_length=1, description="Flower basic-auth user")
    # Celery task events cost a few Redis PUBLISHes per action (a third of a trivial
    # action's throughput). Flower turns them on by broadcast while it watches.
    task_events: bool = Field(False, description="always send Celery task events")
    flower_password: SecretStr | None = Field(
        None, description="Flower basic-auth password; generated and printed when unset"
    )

    # Reliability (docs/reliability.md): limits, leases, idempotency, dead letters.
    limits_redis_url: str | None = Field(None, description="Redis of limits; default: broker")
    lease_s: float = Field(
        10.0, gt=0, description="idempotency/concurrency lease; a dead worker's lapses after it"
    )
    idempotency_retention_s: int = Field(86_400, ge=60, description="completed results kept")
    dead_letter_retention_days: int = Field(30, ge=1, description="dead letters kept")
    max_defer_s: float = Field(300.0, gt=0, description="longest single re-queue countdown")
    test_probe_executor: bool = Field(
        False, description="TEST ONLY: serve `code` with the reliability probe, not Docker"
    )
    test_probe_dir: Path | None = Field(None, description="TEST ONLY: where the probe writes")

    # files primitive and the code workspace mount (docs/files.md)
    workspace_root: Path | None = Field(None, description="tenant workspaces; <home>/workspaces")

    # browse primitive (docs/browse.md)
    browser_executable: Path = Field(
        Path("/usr/bin/chromium"), description="Chromium binary (Debian package chromium)"
    )

    # api / email primitives (docs/api-email.md)
    secrets_dir: Path | None = Field(None, description="secret files (Kubernetes Secret mount)")
    smtp_host: str | None = Field(None, description="SMTP relay; email is refused without one")
    smtp_port: int = Field(587, ge=1, le=65_535, description="SMTP relay port")
    smtp_tls: Literal["none", "starttls", "tls"] = Field("starttls", description="relay TLS")
    smtp_secret: str | None = Field(None, description="secret 'user:password' for SMTP AUTH")
    smtp_from: str = Field("actionfleet@localhost", description="sender of every email")
    smtp_allow_cidrs: str = Field(
        "", description="comma-separated CIDRs the relay may be in even if private/loopback"
    )
    smtp_ca_file: Path | None = Field(None, description="CA bundle to verify the relay with")
    smtp_timeout_s: float = Field(30.0, gt=0, description="relay connect/command timeout")
    email_outbox_ttl_s: int = Field(
        30 * 86_400, ge=60, description="how long an email's exactly-once record is kept"
    )

    @model_validator(mode="after")
    def _backend_runtime(self) -> Settings:
        if self.sandbox_backend == "runc" and self.sandbox_runtime != "runc":
            raise ValueError(
                "sandbox_backend 'runc' runs runc only: set ACTIONFLEET_SANDBOX_RUNTIME=runc, "
                "or ACTIONFLEET_SANDBOX_BACKEND=docker for gVisor (runsc)"
            )
        return self

    @field_validator("worker_cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # `VAR: ${X:-}` in compose: set but empty means not pinned
        # The worker's own parser: the setting refuses exactly what the worker would.
        from workers.affinity import CpuSpecError, parse_cpus

        try:
            parse_cpus(value)
        except CpuSpecError as exc:
            raise ValueError(str(exc)) from None
        return value

    def fleet_file(self) -> Path:
        return self.home / "fleet.json"

    def resolved_workspace_root(self) -> Path:
        return self.workspace_root or self.home / "workspaces"

    def resolved_broker_url(self) -> str | None:
        """The configured broker, else the one recorded by ``actionfleet up`` in this home."""
        if self.broker_url:
            return self.broker_url
        try:
            return json.loads(self.fleet_file().read_text())["broker_url"]
        except (OSError, ValueError, KeyError):
            return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
