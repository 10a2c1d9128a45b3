"""Flower, always behind authentication.

Flower shows workers, tasks and their states; unauthenticated it also lets anyone shut
workers down or revoke tasks, so this launcher never starts it without basic auth:
credentials come from ``ACTIONFLEET_FLOWER_USER`` / ``ACTIONFLEET_FLOWER_PASSWORD``, and a
random password is generated (and printed once) when none is set. The credentials reach
Flower through its ``FLOWER_BASIC_AUTH`` environment variable, not its command line, so
they do not show in ``ps``.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass

from workers.config import Settings

__all__ = ["FlowerAuth", "flower_argv", "flower_auth", "flower_env"]

# Forget workers that stopped answering an hour ago, or a fleet that scales up and down
# fills the dashboard with dead nodes.
PURGE_OFFLINE_WORKERS_S = 3600


@dataclass(frozen=True)
class FlowerAuth:
    user: str
    password: str
    generated: bool

    def header_value(self) -> str:
        return f"{self.user}:{self.password}"


def flower_auth(settings: Settings) -> FlowerAuth:
    """The configured credentials, or the configured user with a fresh random password."""
    if settings.flower_password is not None:
        password = settings.flower_password.get_secret_value()
        if password:
            return FlowerAuth(settings.flower_user, password, generated=False)
    return FlowerAuth(settings.flower_user, secrets.token_urlsafe(18), generated=True)


def flower_argv(broker_url: str, host: str, port: int) -> list[str]:
    """``celery flower`` for the ActionFleet app (its queues, priorities, transport)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "--broker",
        broker_url,
        "flower",
        f"--address={host}",
        f"--port={port}",
        f"--purge_offline_workers={PURGE_OFFLINE_WORKERS_S}",
    ]


def flower_env(env: dict[str, str], auth: FlowerAuth) -> dict[str, str]:
    """``env`` plus Flower's auth; drops any FLOWER_* the caller had (no auth override)."""
    clean = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
    clean["FLOWER_BASIC_AUTH"] = auth.header_value()
    return clean
