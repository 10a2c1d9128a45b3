"""Audit settings: ``ACTIONFLEET_CLICKHOUSE_DSN`` and ``ACTIONFLEET_AUDIT_*``, and the same
as one plain value (``AuditSettings``) for the emitter, the ingester and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydantic import Field

from producer.config import ProducerSettings

__all__ = [
    "DEAD_STREAM",
    "DEFAULT_SENSITIVE_FIELDS",
    "GROUP",
    "STREAM",
    "AuditEnvSettings",
    "AuditSettings",
    "audit_settings",
]

STREAM = "actionfleet:audit"
DEAD_STREAM = "actionfleet:audit:dead"
GROUP = "audit-ingesters"


class AuditEnvSettings(ProducerSettings):
    """The audit knobs, read from the environment (the fleet's home and broker included)."""

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


@lru_cache(maxsize=1)
def _env() -> AuditEnvSettings:
    return AuditEnvSettings()


DEFAULT_SENSITIVE_FIELDS: frozenset[str] = frozenset(
    f.strip() for f in AuditEnvSettings.model_fields["audit_sensitive_fields"].default.split(",")
)


@dataclass(frozen=True)
class AuditSettings:
    home: Path = Path(".actionfleet")
    broker_url: str | None = None
    clickhouse_dsn: str = ""
    stream: str = STREAM
    retention_days: int = 365
    batch_size: int = 10_000
    batch_age_s: float = 1.0
    claim_idle_s: float = 60.0
    preview_bytes: int = 4_096
    sensitive_fields: frozenset[str] = field(default_factory=lambda: DEFAULT_SENSITIVE_FIELDS)
    spool_dir: Path | None = None
    linger_s: float = 0.1

    @property
    def dsn(self) -> str:
        """The configured DSN; empty means the embedded store under the home."""
        return self.clickhouse_dsn or f"chdb://{(self.home / 'audit').resolve()}"

    @property
    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.home / "audit-spool"


def _fields(raw: str) -> frozenset[str]:
    return frozenset(s.strip().lower() for s in raw.split(",") if s.strip())


def audit_settings(settings: AuditEnvSettings | None = None) -> AuditSettings:
    """Audit settings from a settings object (default: the environment's)."""
    s = settings or _env()
    return AuditSettings(
        home=Path(s.home),
        broker_url=s.resolved_broker_url(),
        clickhouse_dsn=s.clickhouse_dsn or "",
        stream=s.audit_stream,
        retention_days=s.audit_retention_days,
        batch_size=s.audit_batch_size,
        batch_age_s=s.audit_batch_age_s,
        claim_idle_s=s.audit_claim_idle_s,
        preview_bytes=s.audit_preview_bytes,
        sensitive_fields=_fields(s.audit_sensitive_fields),
        spool_dir=s.audit_spool_dir,
        linger_s=s.audit_linger_s,
    )
