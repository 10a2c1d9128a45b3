"""The worker side's settings: every ``ACTIONFLEET_*`` knob in one typed object.

``Settings`` is the producer's settings (how to reach the fleet) plus the sandbox and audit
settings of their own packages, plus what only workers and operators use. Each field reads
``ACTIONFLEET_<NAME>``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from audit.config import AuditEnvSettings
from sandboxes.config import SandboxSettings

__all__ = ["Settings", "get_settings"]


class Settings(AuditEnvSettings, SandboxSettings):
    """Every knob of a worker, an operator command or a local fleet."""

    policy: Path | None = Field(None, description="YAML policy file; default: built-in profile")
    worker_cpus: str | None = Field(
        None,
        description="pin the worker to these CPUs, e.g. 0, 0-3 or 0,2 (worker --cpus)",
    )

    # Operations (workers/ops/metrics.py, workers/ops/flower.py). Port 0: a free port (`up`).
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

    # Producer identity (docs/security.md); `auth` and `key` come from the producer's.
    auth_skew_s: float = Field(
        300.0, gt=0, le=3_600, description="allowed clock difference of a signed action"
    )
    auth_cache_s: float = Field(
        1.0, ge=0, le=60, description="key records cached per process; a revocation waits it"
    )
    admin_url: str | None = Field(
        None, description="the operator's Redis URL (keys, ACL); default: the fleet's"
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

    # Approvals (docs/policy.md): actions a rule parks for a human's decision.
    approval_sweep_s: float = Field(
        5.0, gt=0, le=3_600, description="how often workers expire timed-out approvals"
    )
    approval_redispatch_s: float = Field(
        60.0, gt=0, description="a decided action no worker took is sent again after this"
    )
    approval_retention_s: int = Field(
        7 * 86_400, ge=60, description="decided approval records kept for `approvals show`"
    )

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
    def _nonce_window(self) -> Settings:
        # A nonce record lives as long as the idempotency record, and must outlive the
        # clock-skew window, or an exact copy of an old message could run again.
        if self.idempotency_retention_s < 2 * self.auth_skew_s:
            raise ValueError(
                "idempotency_retention_s must be at least twice auth_skew_s "
                f"({self.idempotency_retention_s} < 2 x {self.auth_skew_s})"
            )
        return self

    @field_validator("worker_cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # `VAR: ${X:-}` in compose: set but empty means not pinned
        # The worker's own parser: the setting refuses exactly what the worker would.
        from workers.celery.affinity import CpuSpecError, parse_cpus

        try:
            parse_cpus(value)
        except CpuSpecError as exc:
            raise ValueError(str(exc)) from None
        return value

    def resolved_admin_url(self) -> str | None:
        """Where the operator's commands (keys, ACL) reach the fleet's Redis."""
        if self.admin_url:
            return self.admin_url
        url = self._fleet().get("admin_url")
        if isinstance(url, str):
            return url
        return self.limits_redis_url or self.resolved_broker_url()

    def resolved_workspace_root(self) -> Path:
        return self.workspace_root or self.home / "workspaces"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
