"""Audit settings: the ``audit_*`` fields of ``producer.config.Settings`` as one value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from producer.config import Settings, get_settings

__all__ = [
    "DEAD_STREAM",
    "DEFAULT_SENSITIVE_FIELDS",
    "GROUP",
    "STREAM",
    "AuditSettings",
    "audit_settings",
]

STREAM = "actionfleet:audit"
DEAD_STREAM = "actionfleet:audit:dead"
GROUP = "audit-ingesters"

DEFAULT_SENSITIVE_FIELDS: frozenset[str] = frozenset(
    f.strip() for f in Settings.model_fields["audit_sensitive_fields"].default.split(",")
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


def audit_settings(settings: Settings | None = None) -> AuditSettings:
    """Audit settings from the project's settings object (default: ``get_settings()``)."""
    s = settings or get_settings()
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
