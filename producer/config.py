"""The producer's configuration, from ``ACTIONFLEET_*`` environment variables.

Only what an agent-side process needs to reach a fleet lives here; the worker side extends
it (``workers.config.Settings``) with everything that runs actions.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ProducerSettings", "producer_settings"]


class ProducerSettings(BaseSettings):
    """How a producer finds the fleet. Each field reads ``ACTIONFLEET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ACTIONFLEET_", extra="ignore")

    home: Path = Field(Path(".actionfleet"), description="state dir: fleet.json, logs, caches")
    broker_url: str | None = Field(None, description="redis:// URL; default: the running fleet's")
    result_backend: str | None = Field(None, description="default: same as broker_url")
    result_expires_s: int = Field(86_400, ge=60, description="how long results are kept")
    visibility_timeout_s: int = Field(
        3_600, ge=5, description="unacked actions are redelivered after this; > longest action"
    )

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
def producer_settings() -> ProducerSettings:
    return ProducerSettings()
