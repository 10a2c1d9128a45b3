"""The producer's configuration, from ``ACTIONFLEET_*`` environment variables.

Only what an agent-side process needs to reach a fleet lives here; the worker side extends
it (``workers.config.Settings``) with everything that runs actions.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ProducerSettings", "producer_settings", "with_credentials"]


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
    key: SecretStr | None = Field(
        None, description="this producer's key (afk1_…): signs every action; never logged"
    )
    auth: Literal["required", "off"] = Field(
        "required",
        description="workers: refuse unsigned actions (required) or run them as the tenant "
        "they name (off: a single-user laptop only)",
    )
    broker_auth: Literal["url", "key"] = Field(
        "url",
        description="how to log in to Redis: the credentials in the broker URL (url), or the "
        "ACL user and password derived from the producer key (key)",
    )

    def fleet_file(self) -> Path:
        return self.home / "fleet.json"

    def _fleet(self) -> dict[str, object]:
        try:
            data = json.loads(self.fleet_file().read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def resolved_broker_url(self) -> str | None:
        """The configured broker, else the one recorded by ``actionfleet up`` in this home."""
        if self.broker_url:
            return self.broker_url
        url = self._fleet().get("broker_url")
        return url if isinstance(url, str) else None

    def resolved_key(self) -> str | None:
        """The producer key: ``ACTIONFLEET_KEY``, else the operator key of ``up`` in this
        home (fleet.json, readable by its owner only)."""
        if self.key is not None:
            return self.key.get_secret_value()
        key = self._fleet().get("operator_key")
        return key if isinstance(key, str) else None

    def resolved_broker_auth(self) -> str:
        """``key`` when configured, or when the fleet of this home enforces Redis ACLs."""
        if self.broker_auth == "key" or (
            not self.broker_url and self._fleet().get("broker_auth") == "key"
        ):
            return "key"
        return "url"


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user`` (any credentials already in it replaced)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@lru_cache(maxsize=1)
def producer_settings() -> ProducerSettings:
    return ProducerSettings()
