"""Producer key records: the public key and the scope of each key, in one Redis hash.

A record says which tenants, agents and primitives its key may act for (``fnmatch``
patterns: ``acme``, ``researcher-*``, ``*``), when it was made, and when it stops being
accepted (``expires_at``: set by a rotation's grace period) or was revoked. The secret is
never stored: only the public key, and the SHA-256 of the Redis password the key derives.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

import redis

from producer.auth import ProducerKey
from producer.models import PRIMITIVES

__all__ = ["KEYS_HASH", "KeyRecord", "KeyStore"]

KEYS_HASH = "af:auth:keys"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    tenant: str  # fnmatch pattern; "*" for an operator key
    agent: str  # fnmatch pattern
    primitives: tuple[str, ...]
    public_key: str  # Ed25519, raw, base64url
    redis_password_sha256: str
    created_at: str
    description: str = ""
    expires_at: str | None = None  # end of a rotation's grace period
    revoked_at: str | None = None
    replaced_by: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRecord:
        data = json.loads(text)
        data["primitives"] = tuple(data.get("primitives") or ())
        return cls(**data)

    def state(self, now: datetime | None = None) -> str:
        """``active``, ``expiring`` (in a rotation's grace), ``expired`` or ``revoked``."""
        if self.revoked_at:
            return "revoked"
        if self.expires_at:
            ends = datetime.fromisoformat(self.expires_at)
            return "expired" if (now or _now()) >= ends else "expiring"
        return "active"

    def usable(self, now: datetime | None = None) -> bool:
        return self.state(now) in ("active", "expiring")

    def allows(self, tenant_id: str, agent_id: str, primitive: str) -> str | None:
        """None when the scope covers the action, else what is outside it."""
        if not fnmatchcase(tenant_id, self.tenant):
            return f"tenant {tenant_id!r} (this key acts for tenant {self.tenant!r})"
        if not fnmatchcase(agent_id, self.agent):
            return f"agent {agent_id!r} (this key acts for agents {self.agent!r})"
        if primitive not in self.primitives:
            return f"primitive {primitive!r} (this key may use {', '.join(self.primitives)})"
        return None

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: everything but the password hash."""
        data = asdict(self)
        data.pop("redis_password_sha256")
        data["state"] = self.state()
        return data


# Names as the message contract allows them, with * and ? as wildcards: the same pattern
# means the same in fnmatch (the worker's check) and in a Redis ACL key glob.
_PATTERN = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9._:@/*?-]{0,127}$")


def _check_pattern(name: str, pattern: str) -> str:
    pattern = pattern.strip()
    if not _PATTERN.match(pattern):
        raise ValueError(
            f"{name} must be a name or a pattern with * and ? like 'researcher-*', not {pattern!r}"
        )
    return pattern


def _check_primitives(primitives: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(p.strip() for p in primitives if p.strip()))
    unknown = [p for p in chosen if p not in PRIMITIVES]
    if unknown or not chosen:
        raise ValueError(
            f"primitives must be some of {', '.join(PRIMITIVES)}; got {list(primitives)!r}"
        )
    return chosen


class KeyStore:
    """The key records of one fleet (its Redis: the broker, or the limits Redis)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def get(self, key_id: str) -> KeyRecord | None:
        raw = self.client.hget(KEYS_HASH, key_id)
        return None if raw is None else KeyRecord.from_json(raw)

    def list(self) -> list[KeyRecord]:
        rows = self.client.hgetall(KEYS_HASH)
        return sorted(
            (KeyRecord.from_json(v) for v in rows.values()), key=lambda r: (r.created_at, r.key_id)
        )

    def _put(self, record: KeyRecord) -> None:
        self.client.hset(KEYS_HASH, record.key_id, record.to_json())

    def create(
        self,
        tenant: str,
        agent: str = "*",
        primitives: list[str] | tuple[str, ...] = PRIMITIVES,
        description: str = "",
        now: datetime | None = None,
    ) -> tuple[KeyRecord, ProducerKey]:
        """A new key; the ``ProducerKey`` (its secret) is returned once and not kept."""
        key = ProducerKey.generate()
        _, password = key.redis_credentials()
        record = KeyRecord(
            key_id=key.key_id,
            tenant=_check_pattern("tenant", tenant),
            agent=_check_pattern("agent", agent),
            primitives=_check_primitives(primitives),
            public_key=key.public_key_b64(),
            redis_password_sha256=hashlib.sha256(password.encode()).hexdigest(),
            created_at=(now or _now()).isoformat(),
            description=description[:256],
        )
        self._put(record)
        return record, key

    def revoke(self, key_id: str, now: datetime | None = None) -> KeyRecord:
        record = self._require(key_id)
        if record.revoked_at:
            return record
        record = replace(record, revoked_at=(now or _now()).isoformat())
        self._put(record)
        return record

    def rotate(
        self, key_id: str, grace_s: float, now: datetime | None = None
    ) -> tuple[KeyRecord, ProducerKey, KeyRecord]:
        """A new key of the same scope; the old one is accepted ``grace_s`` longer.
        Returns (new record, new key, old record)."""
        old = self._require(key_id)
        if not old.usable(now):
            raise ValueError(f"key {key_id} is {old.state(now)}: create a new key instead")
        when = now or _now()
        new, key = self.create(old.tenant, old.agent, old.primitives, old.description, when)
        ends = min(
            when + timedelta(seconds=max(0.0, grace_s)),
            datetime.fromisoformat(old.expires_at)
            if old.expires_at
            else datetime.max.replace(tzinfo=UTC),
        )
        old = replace(old, expires_at=ends.isoformat(), replaced_by=new.key_id)
        self._put(old)
        return new, key, old

    def expire(self, key_id: str, at: datetime) -> KeyRecord:
        """End a key's acceptance at ``at`` (a rotation's grace, set by hand)."""
        record = replace(self._require(key_id), expires_at=at.isoformat())
        self._put(record)
        return record

    def _require(self, key_id: str) -> KeyRecord:
        record = self.get(key_id)
        if record is None:
            raise KeyError(f"no key {key_id!r}: `actionfleet keys list` shows the keys")
        return record
