"""Checking who sent an action, once per delivery, before anything of it is trusted.

``Authenticator.authenticate`` ends an action ``denied`` before policy, limits or the
executor see it when:

- it carries no proof and the fleet requires one (``ACTIONFLEET_AUTH=required``);
- its key is unknown, revoked, or past the end of a rotation's grace period;
- the signature does not match the message (one byte changed, another key);
- it was signed outside the allowed clock skew (``auth_skew_s``) and is not a delivery of
  an action already accepted;
- its nonce was already used by another action (a replay);
  (all of these: ``unauthenticated``)
- the key does not cover its tenant, agent or primitive (``policy_denied``).

Redeliveries are not replays: the first accepted delivery records its nonce with the
action's id, and a later delivery of the same action (a crashed worker, a retry, a
deferral, hours later) is recognised by that record, whatever its timestamp. An exact
copy of an accepted message is that same action, and its idempotency record answers it
without running it again. Nonce records outlive the skew window, so a message whose
record has lapsed is always refused by its timestamp.

Cost: the key record is cached per process for ``cache_s`` (so a revocation takes effect
within that time), the signature check is one Ed25519 verification -- or, for a member of
a signed batch (``ProducerKey.sign_many``), a few SHA-256 hashes up to a tree root this
process already verified (``_roots``, bounded; keyed by public key, root statement and
signature, so a cached root proves nothing for another key) -- and the nonce check
rides in the pipeline's one admission round trip (``workers.guarantees.admission``,
section 0) when there is one, or is a round trip of its own.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from producer.auth import signed_statement, verify_statement
from producer.errors import PolicyDenied, Unauthenticated
from producer.models import Action
from workers.auth.grants import GrantStore, message_digest
from workers.auth.keys import KeyRecord, KeyStore

__all__ = ["NONCE_PREFIX", "Authenticator", "Identity", "NonceCheck"]

log = logging.getLogger(__name__)
NONCE_PREFIX = "af:auth:nonce"


@dataclass(frozen=True, slots=True)
class NonceCheck:
    """The replay check of one delivery: record ``action_id`` under ``key`` when the
    signature is ``fresh`` (inside the skew window); refuse when another action holds the
    nonce, or when it is unknown and the signature is not fresh."""

    key: str
    key_id: str
    nonce: str
    action_id: str
    fresh: bool
    ttl_s: int
    ts: int
    skew_s: float

    def run(self, client: redis.Redis) -> None:
        """The check as a round trip of its own (no admission script to ride in)."""
        if self.fresh:
            seen = client.set(self.key, self.action_id, nx=True, get=True, ex=self.ttl_s)
        else:
            seen = client.get(self.key)
        if seen is not None and seen.decode() != self.action_id:
            raise self.refusal("replay")
        if seen is None and not self.fresh:
            raise self.refusal("stale")

    def refusal(self, outcome: str) -> Unauthenticated:
        if outcome == "replay":
            return Unauthenticated(
                f"nonce {self.nonce} of key {self.key_id} was already used by another action: "
                "a replayed or forged message; every signature needs a fresh nonce",
                reason="replay",
                key_id=self.key_id,
            )
        signed = datetime.fromtimestamp(self.ts / 1000, UTC).isoformat()
        return Unauthenticated(
            f"the action was signed at {signed}, more than {self.skew_s:.0f} s from this "
            "worker's clock: check the producer's clock and send it again",
            reason="stale_timestamp",
            key_id=self.key_id,
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an accepted action came from; ``nonce``: its replay check, still to run in the
    admission script (``authenticate(defer_nonce=True)``)."""

    key_id: str
    record: KeyRecord
    nonce: NonceCheck | None = None


class Authenticator:
    def __init__(
        self,
        client: redis.Redis,
        *,
        required: bool = True,
        skew_s: float = 300.0,
        nonce_ttl_s: int = 86_400,
        cache_s: float = 1.0,
    ) -> None:
        if nonce_ttl_s < 2 * skew_s:
            raise ValueError("nonce records must outlive the clock-skew window (2 x skew)")
        self.store = KeyStore(client)
        self.grants = GrantStore(client)
        self.client = client
        self.required = required
        self.skew_ms = int(skew_s * 1000)
        self.nonce_ttl_s = int(nonce_ttl_s)
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, KeyRecord]] = {}
        # Batch roots this process verified: (public key, statement, signature).
        self._roots: OrderedDict[tuple[str, bytes, str], None] = OrderedDict()
        self.roots_max = 4096

    def _verified(self, record: KeyRecord, raw: dict[str, Any], proof: Any) -> bool:
        statement = signed_statement(
            raw, record.key_id, proof.ts, proof.nonce, proof.index, proof.path
        )
        if statement is None:
            return False
        if proof.path is None:  # a single action: its statement is unique, nothing to cache
            return verify_statement(record.public_key, statement, proof.sig)
        entry = (record.public_key, statement, proof.sig)
        if entry in self._roots:
            self._roots.move_to_end(entry)
            return True
        if not verify_statement(record.public_key, statement, proof.sig):
            return False
        self._roots[entry] = None
        if len(self._roots) > self.roots_max:
            self._roots.popitem(last=False)
        return True

    def _record(self, key_id: str) -> KeyRecord | None:
        hit = self._cache.get(key_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        record = self.store.get(key_id)
        if record is None:
            self._cache.pop(key_id, None)
        else:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key_id] = (now, record)
        return record

    def authenticate(
        self,
        action: Action,
        raw: dict[str, Any],
        now: datetime | None = None,
        *,
        defer_nonce: bool = False,
    ) -> Identity | None:
        """The sender's identity, or None when the fleet runs with auth off. Raises
        ``Unauthenticated`` or ``PolicyDenied``; nothing of the action has run then. With
        ``defer_nonce`` the replay check is returned (``Identity.nonce``) for the caller's
        admission round trip instead of being made here."""
        if not self.required:
            return None
        proof = action.auth
        if proof is None and action.workflow is not None:
            return self._granted(action, raw, now)
        if proof is None:
            raise Unauthenticated(
                "this fleet runs only signed actions and this one has no signature: send it "
                "with ActionClient(key=...) or set ACTIONFLEET_KEY to a key from "
                "`actionfleet keys create`",
                reason="missing",
            )
        key_id = proof.key_id
        record = self._usable(key_id, now)
        when = now or datetime.now(UTC)
        if not self._verified(record, raw, proof):
            raise Unauthenticated(
                f"the signature does not match this message for key {key_id}: the message "
                "was changed after it was signed, or signed with another key; sign it again "
                "through ActionClient",
                reason="bad_signature",
                key_id=key_id,
            )
        self._check_scope(record, action)
        check = NonceCheck(
            key=f"{NONCE_PREFIX}:{key_id}:{proof.nonce}",
            key_id=key_id,
            nonce=proof.nonce,
            action_id=action.action_id,
            fresh=abs(int(when.timestamp() * 1000) - proof.ts) <= self.skew_ms,
            ttl_s=self.nonce_ttl_s,
            ts=proof.ts,
            skew_s=self.skew_ms / 1000,
        )
        if defer_nonce:
            return Identity(key_id, record, check)
        check.run(self.client)
        return Identity(key_id, record)

    def _usable(self, key_id: str, now: datetime | None) -> KeyRecord:
        """The record of a key this fleet accepts now, or ``Unauthenticated``."""
        record = self._record(key_id)
        if record is None:
            raise Unauthenticated(
                f"key {key_id} is unknown to this fleet: use a key made by "
                "`actionfleet keys create` for this fleet",
                reason="unknown_key",
                key_id=key_id,
            )
        state = record.state(now or datetime.now(UTC))
        if state == "revoked":
            raise Unauthenticated(
                f"key {key_id} was revoked at {record.revoked_at}: ask the operator for a new key",
                reason="revoked",
                key_id=key_id,
            )
        if state == "expired":
            raise Unauthenticated(
                f"key {key_id} stopped being accepted at {record.expires_at} (it was rotated): "
                "use its replacement" + (f" {record.replaced_by}" if record.replaced_by else ""),
                reason="expired",
                key_id=key_id,
            )
        return record

    @staticmethod
    def _check_scope(record: KeyRecord, action: Action) -> None:
        outside = record.allows(action.tenant_id, action.agent_id, action.primitive)
        if outside is not None:
            raise PolicyDenied(
                f"key {record.key_id} may not act for {outside}; use a key made for it",
                reason="key_scope",
                key_id=record.key_id,
            )

    def _granted(self, action: Action, raw: dict[str, Any], now: datetime | None) -> Identity:
        """A workflow step: accepted against the engine's grant for exactly this message,
        as the key the workflow was verified with (``workers.auth.grants``)."""
        ref = action.workflow
        assert ref is not None
        grant = self.grants.get(ref.id, ref.step, ref.phase)
        if grant is None:
            raise Unauthenticated(
                f"workflow {ref.id} step {ref.step!r} has no grant from the fleet's workflow "
                "engine: steps are sent by the engine only (actionfleet workflow run)",
                reason="no_grant",
            )
        if grant.digest != message_digest(raw):
            raise Unauthenticated(
                f"workflow {ref.id} step {ref.step!r} differs from what the engine granted: "
                "a changed or forged step message",
                reason="grant_mismatch",
                key_id=grant.key_id,
            )
        record = self._usable(grant.key_id, now)
        self._check_scope(record, action)
        return Identity(grant.key_id, record)
