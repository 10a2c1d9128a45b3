"""Who sent a workflow message, and may they: the producer's signature and key scope.

The engine runs a workflow only for a message signed by a usable producer key whose scope
covers the workflow's tenant, agent and every primitive of its steps; with signatures off
(``auth_required`` False) an unsigned message is accepted as no key.
"""

from __future__ import annotations

import time
from typing import Any

from producer.auth import verify_signature
from workers.auth.keys import KeyStore

__all__ = ["Refused", "verify_message"]


class Refused(Exception):
    """A workflow message the engine will not run (bad signature, key, scope, shape)."""


def verify_message(
    keys: KeyStore,
    message: dict[str, Any],
    tenant: str,
    agent: str,
    primitives: set[str],
    *,
    auth_required: bool,
    skew_s: float,
) -> str:
    """The key id ``message`` was signed with (``""`` with auth off); ``Refused`` when the
    signature, the key or its scope does not hold."""
    proof = message.get("auth")
    if not isinstance(proof, dict):
        if auth_required:
            raise Refused("unsigned workflow message on a fleet that requires signatures")
        return ""
    key_id = str(proof.get("key_id", ""))
    record = keys.get(key_id)
    if record is None or not record.usable():
        raise Refused(f"key {key_id} is unknown, revoked or expired")
    ts, nonce, sig = proof.get("ts"), str(proof.get("nonce", "")), str(proof.get("sig", ""))
    if not isinstance(ts, int) or not verify_signature(
        record.public_key, message, key_id, ts, nonce, sig
    ):
        raise Refused(f"bad signature for key {key_id}")
    # Replays: a start is idempotent by workflow id and its state outlives this window.
    if abs(time.time() * 1000 - ts) > skew_s * 1000:
        raise Refused(f"message of key {key_id} signed outside the clock-skew window")
    for primitive in sorted(primitives) or list(record.primitives[:1]):
        outside = record.allows(tenant, agent, primitive)
        if outside is not None:
            raise Refused(f"key {key_id} may not act for {outside}")
    return key_id
