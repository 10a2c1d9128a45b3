"""Who may decide approvals over HTTP: approver tokens, kept as SHA-256 hashes in Redis.

``actionfleet approvals approver add NAME [--tenants PATTERN]`` prints a token
(``afa1_…``) once; the fleet keeps its hash, the approver's name and the tenants whose
actions they may decide (an fnmatch pattern). The HTTP endpoint records the name as the
approver of what it decides. Operators on the fleet's machine decide with the CLI, whose
Redis access is the authority.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase

import redis

__all__ = ["APPROVERS_HASH", "Approver", "ApproverStore"]

APPROVERS_HASH = "af:approvers"
TOKEN_PREFIX = "afa1_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Approver:
    name: str
    tenants: str  # fnmatch pattern
    created_at: str

    def may_decide(self, tenant_id: str) -> bool:
        return fnmatchcase(tenant_id, self.tenants)


class ApproverStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, name: str, tenants: str = "*") -> tuple[Approver, str]:
        """A new token for ``name``; returned once, only its hash is kept."""
        if not _NAME.match(name):
            raise ValueError(f"approver name {name!r}: letters, digits and . _ @ - only")
        if not tenants.strip():
            raise ValueError("--tenants: a tenant or a pattern like 'acme*' or '*'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        approver = Approver(name, tenants.strip(), datetime.now(UTC).isoformat())
        self.client.hset(APPROVERS_HASH, _digest(token), json.dumps(asdict(approver)))
        return approver, token

    def resolve(self, token: str) -> Approver | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        raw = self.client.hget(APPROVERS_HASH, _digest(token))
        return None if raw is None else Approver(**json.loads(raw))

    def list(self) -> list[Approver]:
        rows = self.client.hgetall(APPROVERS_HASH).values()
        return sorted((Approver(**json.loads(v)) for v in rows), key=lambda a: a.created_at)

    def remove(self, name: str) -> int:
        """Revoke every token of ``name``; returns how many."""
        gone = [
            k
            for k, v in self.client.hgetall(APPROVERS_HASH).items()
            if json.loads(v)["name"] == name
        ]
        if gone:
            self.client.hdel(APPROVERS_HASH, *gone)
        return len(gone)
