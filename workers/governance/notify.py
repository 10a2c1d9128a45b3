"""The approval webhook: one JSON POST per parked action, through the egress guard.

The URL is checked and its address pinned like any action's traffic
(``workers.outbound``): with the default egress rules a loopback or private webhook is
refused unless ``rules.approvals.webhook.egress`` allows it. A failed notification is
logged and never fails or delays the action: the approval still waits in Redis, and
``actionfleet approvals list`` shows it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from workers.governance.rules import WebhookSettings
from workers.outbound.egress import EgressGuard
from workers.outbound.http import GuardedTransport

__all__ = ["notify", "notify_in_background"]

log = logging.getLogger(__name__)


def notify(webhook: WebhookSettings, body: dict[str, Any]) -> int:
    """POST ``body`` to the webhook; returns the HTTP status. Raises ``NetworkBlocked``
    when the guard refuses the URL, ``httpx.HTTPError`` when the request fails."""
    transport = GuardedTransport(EgressGuard(webhook.egress))
    with httpx.Client(transport=transport, timeout=webhook.timeout_s, trust_env=False) as client:
        response = client.post(
            webhook.url, json=body, headers={"user-agent": "actionfleet-approvals"}
        )
        return response.status_code


def notify_in_background(webhook: WebhookSettings, body: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            status = notify(webhook, body)
            if status >= 300:
                log.warning("approval webhook answered %s for %s", status, body.get("id"))
        except Exception as exc:  # the approval waits in Redis whatever happens here
            log.warning("approval webhook failed for %s: %s", body.get("id"), exc)

    thread = threading.Thread(target=run, name="approval-webhook", daemon=True)
    thread.start()
    return thread
