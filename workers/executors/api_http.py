"""HTTP message rules for the ``api`` executor: what may go into a request and how a
response (or an error) comes back out.

Request side: the agent's header rules, the derived Idempotency-Key, secret injection.
Response side: allowlisted headers, body decoding, Retry-After, scrubbing secrets from
errors. Pure functions: no I/O, so ``workers/executors/api.py`` keeps all of the flow.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from audit.redact import Scrubber
from producer.errors import ActionError, ValidationError_
from workers.outbound.secrets import Secret

RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "location",
    "retry-after",
    "etag",
    "last-modified",
    "date",
    "cache-control",
    "link",
    "x-request-id",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
# Headers the worker owns: framing, routing and encoding are not the agent's to set.
FORBIDDEN_REQUEST_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "accept-encoding",
        "proxy-authorization",
        "proxy-connection",
    }
)
# Dropped from the agent's own headers when a redirect leaves the original origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
IDEMPOTENCY_HEADER = "Idempotency-Key"


# -------------------------------------------------------------------------- requests


def idempotency_header_value(tenant_id: str, idempotency_key: str) -> str:
    """Derived, tenant-scoped, and not the agent's raw key (which may carry meaning)."""
    digest = hashlib.sha256(f"{tenant_id}\0{idempotency_key}".encode()).hexdigest()
    return f"af-{digest[:40]}"


def port_of(url: httpx.URL) -> int:
    """The effective port: secret bindings and origins compare it, default or not."""
    return url.port or {"http": 80, "https": 443}.get(url.scheme, 0)


def header_get(headers: dict[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def header_pop(headers: dict[str, str], name: str) -> None:
    for k in [k for k in headers if k.lower() == name.lower()]:
        del headers[k]


def checked_headers(given: dict[str, str]) -> dict[str, str]:
    """The agent's headers, refused when they could split the request or override the
    worker's own (framing, routing, encoding)."""
    out: dict[str, str] = {}
    for name, value in given.items():
        if not name or any(c in name for c in "\r\n:\0 ") or any(c in value for c in "\r\n\0"):
            raise ValidationError_(
                f"header {name!r} has a forbidden character (CR, LF, NUL, or ':'/space in "
                "the name); remove it",
                field=f"payload.headers.{name}",
            )
        if name.lower() in FORBIDDEN_REQUEST_HEADERS:
            raise ValidationError_(
                f"header {name!r} is set by the worker and cannot be chosen by the action; "
                "remove it",
                field=f"payload.headers.{name}",
            )
        out[name] = value
    return out


def inject_secret(
    headers: dict[str, str], url: httpx.URL, secret: Secret, scheme: str, name: str | None
) -> httpx.URL:
    """Put ``secret`` where ``scheme`` says (mutating ``headers``); returns the URL, which
    carries it for the ``query`` scheme."""
    if scheme == "bearer":
        headers["Authorization"] = f"Bearer {secret.value}"
    elif scheme == "basic":
        token = base64.b64encode(secret.value.encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif scheme == "header":
        assert name
        headers[name] = secret.value
    else:
        assert name
        url = url.copy_merge_params({name: secret.value})
    return url


# -------------------------------------------------------------------------- responses


def retry_after_s(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def decode_body(data: bytes, content_type: str, scrub: Scrubber) -> tuple[Any, str]:
    """The body as JSON, text or base64 (with its format name), secrets scrubbed."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if ctype.startswith("text/"):
            return scrub(data.decode("utf-8", errors="replace")), "text"
        return base64.b64encode(data).decode(), "base64"
    text = scrub(text)
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return json.loads(text), "json"
        except ValueError:
            pass
    return text, "text"


def scrubbed_error(exc: ActionError, scrub: Scrubber) -> ActionError:
    """The same error with every secret value removed from its message, details, output."""
    if not scrub:
        return exc
    exc.message = scrub(exc.message)
    exc.args = (exc.message,)
    exc.details = json.loads(scrub(json.dumps(exc.details, default=str)))
    if exc.output is not None:
        exc.output = json.loads(scrub(json.dumps(exc.output, default=str)))
    return exc
