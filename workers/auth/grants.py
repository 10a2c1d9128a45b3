"""Workflow grants: how a step the fleet sends is accepted without a producer signature.

Workers cannot sign as a producer (the fleet holds public keys only). When the workflow
engine sends a step, it first writes a grant -- ``af:wf:grant:<workflow>:<step>:<phase>``
holding the producer key id the workflow was verified with and the SHA-256 of the exact
step message (``producer.auth.canonical_bytes``: everything but ``auth``). The verifier
accepts an unsigned action that names that workflow step only when the grant exists and
the digest matches; it then checks the key as for a signed action (usable, and its scope
covers the step's tenant, agent and primitive). Producers' Redis users cannot write these
keys (``workers.auth.acl``: they may push to ``actions.*`` only), so a grant can only come
from the engine, which writes one only for a workflow verified with that key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import redis

from producer.auth import canonical_bytes

__all__ = ["GRANT_PREFIX", "Grant", "GrantStore", "message_digest"]

GRANT_PREFIX = "af:wf:grant"


def message_digest(message: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(message)).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    key_id: str
    digest: str


class GrantStore:
    def __init__(self, client: redis.Redis, ttl_s: int = 86_400) -> None:
        self.client = client
        self.ttl_s = ttl_s

    @staticmethod
    def key(workflow_id: str, step: str, phase: str) -> str:
        return f"{GRANT_PREFIX}:{workflow_id}:{step}:{phase}"

    def put(self, workflow_id: str, step: str, phase: str, key_id: str, message: dict) -> None:
        record = json.dumps({"key_id": key_id, "digest": message_digest(message)})
        self.client.set(self.key(workflow_id, step, phase), record, ex=self.ttl_s)

    def get(self, workflow_id: str, step: str, phase: str) -> Grant | None:
        raw = self.client.get(self.key(workflow_id, step, phase))
        if raw is None:
            return None
        data = json.loads(raw)
        return Grant(str(data["key_id"]), str(data["digest"]))
