"""Logged-in sessions: a Playwright storage state kept as a secret, loaded into the fresh
context of one action and never returned or audited.

The secret (``workers.outbound.secrets``: a file in ``secrets_dir`` or an environment
variable) holds the JSON that Playwright's ``context.storage_state()`` writes: ``{"cookies": [...],
"origins": [{"origin": ..., "localStorage": [...]}]}``. As every secret, it is bound to hosts
(``<name>.meta.json`` ``{"hosts": [...]}``): the action's URL must be one of them, and only
cookies and origins of those hosts are loaded, so a session meant for one site is never
offered to another. Every cookie and storage value is registered in
``ctx.extra["secrets"]`` so the audit trail redacts it wherever it shows up.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from producer.errors import PolicyDenied, ValidationError_
from workers.outbound.secrets import ChainSecretStore, Secret

__all__ = ["load_storage_state"]

FIELD = "payload.session"


def _host_allowed(secret: Secret, host: str) -> bool:
    # A cookie domain may start with '.', meaning the domain and its subdomains.
    return secret.allows("https", host.lstrip("."), 443) or secret.allows(
        "http", host.lstrip("."), 80
    )


def load_storage_state(
    store: ChainSecretStore, name: str, url: str, redact: list[str]
) -> dict[str, Any]:
    secret = store.require(name, field=FIELD)
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    port = parts.port or (443 if scheme == "https" else 80)
    if not secret.allows(scheme, host, port):
        raise PolicyDenied(
            f"session {name!r} may only be used on {', '.join(secret.hosts) or 'no host'}, "
            f"not {host}; start at one of its hosts or use another session",
            field=FIELD,
            host=host,
        )
    try:
        state = json.loads(secret.value)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise ValidationError_(
            f"session {name!r} is not a Playwright storage state (a JSON object with "
            "'cookies' and 'origins'); ask the operator to store one",
            field=FIELD,
        )
    cookies = [
        c
        for c in state.get("cookies") or []
        if isinstance(c, dict) and _host_allowed(secret, str(c.get("domain", "")))
    ]
    origins = [
        o
        for o in state.get("origins") or []
        if isinstance(o, dict)
        and _host_allowed(secret, urlsplit(str(o.get("origin"))).hostname or "")
    ]
    for c in cookies:
        if c.get("value"):
            redact.append(str(c["value"]))
    for o in origins:
        for item in o.get("localStorage") or []:
            if isinstance(item, dict) and item.get("value"):
                redact.append(str(item["value"]))
    return {"cookies": cookies, "origins": origins}
