"""Typed configuration from ``ACTIONFLEET_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
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
    audit_sensitive_fields: str = Field(
        "password,passwd,authorization,token,secret,api_key,apikey,cookie,private_key,credentials",
        description="comma-separated field names whose values are never written",
    )
    audit_spool_dir: Path | None = Field(None, description="default: <home>/audit-spool")

    sandbox_runtime: Literal["runc", "runsc"] = Field("runc", description="OCI runtime")
    sandbox_image: str | None = Field(None, description="override the built sandbox image tag")
    debian_mirror: str = Field("http://deb.debian.org/debian", description="for sandbox build")

    def fleet_file(self) -> Path:
        return self.home / "fleet.json"

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
