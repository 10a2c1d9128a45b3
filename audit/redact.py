"""Redaction: what an audit row may say about a payload.

Two rules, both applied before anything is serialized for the stream:
- values under a sensitive field name (``password``, ``authorization``, ``x-api-key``…)
  are replaced, whatever they contain;
- every resolved secret value (and its base64 / URL-encoded spellings) is replaced
  wherever it appears: in values, keys, error messages.

The preview is the canonical JSON of the *redacted* payload, cut to a byte budget; the
sha256 is over the full redacted canonical JSON. Hashing the redacted form, not the
original, is deliberate: a hash of a small payload that contains a secret would let
anyone with the table guess the secret offline.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from audit.config import DEFAULT_SENSITIVE_FIELDS

__all__ = ["MASK", "Redacted", "Scrubber", "is_sensitive", "redact", "scrub"]

MASK = "[REDACTED]"


@dataclass(frozen=True, slots=True)
class Redacted:
    preview: str
    sha256: str
    size: int  # bytes of the full redacted canonical JSON
    truncated: bool


def _variants(secret: str) -> set[str]:
    """Spellings a secret commonly takes on its way into a payload or a log line."""
    out = {secret}
    if len(secret) >= 6:
        raw = secret.encode()
        out.add(base64.b64encode(raw).decode().rstrip("="))
        out.add(base64.urlsafe_b64encode(raw).decode().rstrip("="))
        out.add(quote(secret, safe=""))
        out.add(json.dumps(secret, ensure_ascii=False)[1:-1])  # JSON-escaped form
    return {v for v in out if v}


class Scrubber:
    """Replaces secret values in text; built once per event, reused for every string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        spellings: set[str] = set()
        for s in secrets:
            if isinstance(s, str) and s:
                spellings |= _variants(s)
        # Longest first, so a secret that contains another is replaced whole.
        ordered = sorted(spellings, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)


def is_sensitive(key: str, names: frozenset[str]) -> bool:
    # Payload keys repeat across actions (``path``, ``headers``…): remembering the answer
    # for short keys saves most of the audit's redaction time. Long keys are not kept, so
    # adversarial keys cannot make the cache big.
    if len(key) <= 64:
        return _is_sensitive_cached(key, names)
    return _is_sensitive(key, names)


@functools.lru_cache(maxsize=4_096)
def _is_sensitive_cached(key: str, names: frozenset[str]) -> bool:
    return _is_sensitive(key, names)


def _is_sensitive(key: str, names: frozenset[str]) -> bool:
    norm = key.lower().replace("-", "_").replace(".", "_")
    if norm in names:
        return True
    # Match whole name segments: "x_api_key" and "access_token" yes, "max_tokens" no.
    return any(
        norm.endswith("_" + n) or norm.startswith(n + "_") or f"_{n}_" in norm for n in names
    )


def _walk_plain(obj: Any, names: frozenset[str]) -> Any:
    """``_walk`` with no secrets in play (the common case): only sensitive names apply,
    so strings and numbers pass through as they are."""
    if isinstance(obj, dict):
        return {
            str(k): MASK if is_sensitive(str(k), names) else _walk_plain(v, names)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple | set | frozenset):
        return [_walk_plain(v, names) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if obj is None or isinstance(obj, str | bool | int | float):
        return obj
    return str(obj)


def _walk(obj: Any, names: frozenset[str], scrubber: Scrubber) -> Any:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            key = scrubber(str(k))
            out[key] = MASK if is_sensitive(str(k), names) else _walk(v, names, scrubber)
        return out
    if isinstance(obj, list | tuple | set | frozenset):
        return [_walk(v, names, scrubber) for v in obj]
    if isinstance(obj, str):
        return scrubber(obj)
    if isinstance(obj, bytes):
        return scrubber(obj.decode("utf-8", errors="replace"))
    if obj is None or isinstance(obj, bool | int | float):
        # A numeric secret (a PIN) is still a secret.
        return MASK if scrubber and scrubber(str(obj)) != str(obj) else obj
    return scrubber(str(obj))


def _cut(text: str, max_bytes: int) -> tuple[str, bool]:
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text, False
    # errors="ignore" drops a multi-byte character split by the cut instead of mangling it.
    return raw[:max_bytes].decode("utf-8", errors="ignore"), True


@functools.lru_cache(maxsize=16)
def _lowered(fields: frozenset[str]) -> frozenset[str]:
    # The emitter passes the same frozenset for every event: normalized once.
    return frozenset(n.lower() for n in fields)


def redact(
    payload: Any,
    secrets: Iterable[str] | Scrubber = (),
    sensitive_fields: Iterable[str] = DEFAULT_SENSITIVE_FIELDS,
    max_bytes: int = 4_096,
) -> Redacted:
    """Redacted, size-capped preview of a JSON-able payload plus its sha256 and size."""
    scrubber = secrets if isinstance(secrets, Scrubber) else Scrubber(secrets)
    names = _lowered(frozenset(sensitive_fields))  # frozenset(a frozenset) is itself
    clean = _walk(payload, names, scrubber) if scrubber else _walk_plain(payload, names)
    canonical = json.dumps(
        clean, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    # Belt and braces: a secret assembled across escaping boundaries is caught here too.
    canonical = scrubber(canonical)
    data = canonical.encode()
    preview, truncated = _cut(canonical, max_bytes)
    return Redacted(preview, hashlib.sha256(data).hexdigest(), len(data), truncated)


def scrub(text: str | None, secrets: Iterable[str] | Scrubber = ()) -> str:
    """``text`` with every secret value replaced (for error messages and reasons)."""
    if not text:
        return ""
    scrubber = secrets if isinstance(secrets, Scrubber) else Scrubber(secrets)
    return scrubber(text)
