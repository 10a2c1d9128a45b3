"""Producer keys: who is asking, proven by an Ed25519 signature over each action.

A producer key is one secret string, shown once by ``actionfleet keys create``::

    afk1_<key_id>_<seed>        seed: the 32-byte Ed25519 private key, base64url

The fleet stores only the public key (``workers.auth``), so nothing it holds can sign an
action. ``ProducerKey.sign`` adds an ``auth`` proof to a message: the key id, a timestamp
(ms since the epoch), a random nonce and the signature of::

    b"actionfleet-action-v1\\n" key_id "\\n" ts "\\n" nonce "\\n" canonical(message)

where ``canonical`` is the message without ``auth`` as compact JSON with sorted keys
(UTF-8). Every field of the envelope and the payload is covered: changing one byte, the
tenant or the timestamp breaks the signature. Ed25519 (not an HMAC): verifying needs no
secret, so a stolen fleet database or a worker cannot forge a producer's actions.

``ProducerKey.sign_many`` signs a batch (``ActionClient.submit_many``) with one signature:
each message's bytes as above are a leaf of a Merkle tree (SHA-256, leaves and inner nodes
domain-separated, padded to a power of two, at most ``BATCH_LEAVES`` leaves per tree); the
key signs ``b"actionfleet-batch-v1\n" key_id "\n" depth "\n" root``, and each message
carries that signature, its leaf ``index`` and the sibling hashes on its ``path`` to the
root (concatenated, as one base64url string). A message proves itself alone (nothing of
the other messages is needed), and a worker that already verified a root checks a sibling
message with a few hashes instead of an Ed25519 verification (``workers.auth.verify``):
that is what keeps verification cheap for batch work. Every message keeps its own
timestamp and nonce.

The same seed also derives the producer's Redis password (``redis_credentials``): one
secret gives both the right to publish (a Redis ACL user that may only push to the action
queues and read its tenant's results) and the proof of who published.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "BATCH_LEAVES",
    "KEY_PREFIX",
    "ProducerKey",
    "canonical_bytes",
    "redis_user",
    "signed_bytes",
    "signed_statement",
    "verify_signature",
    "verify_statement",
]

KEY_PREFIX = "afk1"
_KEY_RE = re.compile(r"^afk1_(k[0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DOMAIN = b"actionfleet-action-v1\n"
_REDIS_DOMAIN = b"actionfleet-redis-acl-v1"
_BATCH_DOMAIN = b"actionfleet-batch-v1\n"
BATCH_LEAVES = 256  # leaves per signed tree: a path of 8 hashes (~350 bytes) per message
_MAX_DEPTH = 20
# Leaves, inner nodes and padding hash under different first bytes, so no leaf can pass
# for a node (or padding) and a tree cannot be re-cut into another one (cf. RFC 6962).
_LEAF, _NODE = b"\x00", b"\x01"
_EMPTY = hashlib.sha256(b"\x02").digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical_bytes(message: dict[str, Any]) -> bytes:
    """The message without its ``auth`` proof, as the bytes both sides sign and verify."""
    body = {k: v for k, v in message.items() if k != "auth"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signed_bytes(message: dict[str, Any], key_id: str, ts: int, nonce: str) -> bytes:
    return b"%s%s\n%d\n%s\n%s" % (
        _DOMAIN,
        key_id.encode(),
        ts,
        nonce.encode(),
        canonical_bytes(message),
    )


def _leaf(message: dict[str, Any], key_id: str, ts: int, nonce: str) -> bytes:
    return hashlib.sha256(_LEAF + signed_bytes(message, key_id, ts, nonce)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _statement(key_id: str, depth: int, root: bytes) -> bytes:
    return b"%s%s\n%d\n%s" % (_BATCH_DOMAIN, key_id.encode(), depth, _b64(root).encode())


def signed_statement(
    message: dict[str, Any],
    key_id: str,
    ts: int,
    nonce: str,
    index: int | None = None,
    path: str | None = None,
) -> bytes | None:
    """The bytes the proof's signature must cover: the message's own (``signed_bytes``),
    or, for a batch member (``index`` and ``path``: its sibling hashes, leaf upwards,
    concatenated and base64url-encoded), the statement of the tree root its leaf and path
    lead to. None when the batch proof is malformed."""
    if path is None and index is None:
        return signed_bytes(message, key_id, ts, nonce)
    if path is None or index is None:
        return None
    try:
        siblings = _unb64(path)
    except (binascii.Error, ValueError):
        return None
    depth, rest = divmod(len(siblings), 32)
    if rest or depth > _MAX_DEPTH or not 0 <= index < 2**depth:
        return None
    node = _leaf(message, key_id, ts, nonce)
    for level in range(depth):
        sibling = siblings[32 * level : 32 * level + 32]
        node = _node(sibling, node) if index >> level & 1 else _node(node, sibling)
    return _statement(key_id, depth, node)


def verify_signature(
    public_key: str,
    message: dict[str, Any],
    key_id: str,
    ts: int,
    nonce: str,
    sig: str,
    index: int | None = None,
    path: str | None = None,
) -> bool:
    """True when ``sig`` is the signature of ``message`` (with its proof's fields) by the
    private key of ``public_key`` (raw Ed25519, base64url)."""
    statement = signed_statement(message, key_id, ts, nonce, index, path)
    return statement is not None and verify_statement(public_key, statement, sig)


def verify_statement(public_key: str, statement: bytes, sig: str) -> bool:
    """One Ed25519 verification of ``statement`` (from ``signed_statement``)."""
    try:
        Ed25519PublicKey.from_public_bytes(_unb64(public_key)).verify(_unb64(sig), statement)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def redis_user(key_id: str) -> str:
    """The Redis ACL user of a producer key."""
    return f"p-{key_id}"


@dataclass(frozen=True)
class ProducerKey:
    """A producer's secret key. ``repr`` never shows the seed."""

    key_id: str
    _seed: bytes

    @classmethod
    def generate(cls) -> ProducerKey:
        return cls(f"k{secrets.token_hex(8)}", secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str) -> ProducerKey:
        """From the ``afk1_…`` string; ``ValueError`` (without the text) when malformed."""
        m = _KEY_RE.match(text.strip())
        if not m:
            raise ValueError(
                "not an ActionFleet producer key: expected afk1_<key id>_<secret> as printed "
                "by `actionfleet keys create` (check ACTIONFLEET_KEY)"
            )
        try:
            seed = _unb64(m.group(2))
        except (binascii.Error, ValueError):
            raise ValueError("the producer key's secret part is not base64url") from None
        if len(seed) != 32:
            raise ValueError("the producer key's secret part is not 32 bytes")
        return cls(m.group(1), seed)

    def secret(self) -> str:
        """The string to hand to the producer (shown once, never stored by the fleet)."""
        return f"{KEY_PREFIX}_{self.key_id}_{_b64(self._seed)}"

    @cached_property
    def _signer(self) -> Ed25519PrivateKey:
        # Made once: loading the key costs about as much as a signature.
        return Ed25519PrivateKey.from_private_bytes(self._seed)

    def _private(self) -> Ed25519PrivateKey:
        return self._signer

    def public_key_b64(self) -> str:
        raw = self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return _b64(raw)

    def redis_credentials(self) -> tuple[str, str]:
        """(user, password) of this key's Redis ACL user; the fleet keeps only a hash."""
        password = hmac.new(self._seed, _REDIS_DOMAIN, hashlib.sha256).hexdigest()
        return redis_user(self.key_id), password

    def sign(
        self, message: dict[str, Any], *, now_ms: int | None = None, nonce: str | None = None
    ) -> dict[str, Any]:
        """``message`` with an ``auth`` proof (any earlier proof replaced)."""
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        nonce = nonce or _b64(secrets.token_bytes(16))
        signature = self._private().sign(signed_bytes(message, self.key_id, ts, nonce))
        proof = {"key_id": self.key_id, "ts": ts, "nonce": nonce, "sig": _b64(signature)}
        return {**{k: v for k, v in message.items() if k != "auth"}, "auth": proof}

    def sign_many(
        self, messages: list[dict[str, Any]], *, now_ms: int | None = None
    ) -> list[dict[str, Any]]:
        """``messages`` with batch proofs: one signature per ``BATCH_LEAVES`` messages."""
        ts = int(time.time() * 1000) if now_ms is None else now_ms
        out: list[dict[str, Any]] = []
        for start in range(0, len(messages), BATCH_LEAVES):
            chunk = messages[start : start + BATCH_LEAVES]
            if len(chunk) == 1:
                out.append(self.sign(chunk[0], now_ms=ts))
                continue
            nonces = [_b64(secrets.token_bytes(16)) for _ in chunk]
            depth = (len(chunk) - 1).bit_length()
            levels = [[_leaf(m, self.key_id, ts, n) for m, n in zip(chunk, nonces, strict=True)]]
            levels[0] += [_EMPTY] * (2**depth - len(chunk))
            while len(levels[-1]) > 1:
                below = levels[-1]
                levels.append([_node(below[i], below[i + 1]) for i in range(0, len(below), 2)])
            sig = _b64(self._private().sign(_statement(self.key_id, depth, levels[-1][0])))
            for index, (message, nonce) in enumerate(zip(chunk, nonces, strict=True)):
                path = _b64(b"".join(levels[lv][index >> lv ^ 1] for lv in range(depth)))
                proof = {
                    "key_id": self.key_id,
                    "ts": ts,
                    "nonce": nonce,
                    "sig": sig,
                    "index": index,
                    "path": path,
                }
                out.append({**{k: v for k, v in message.items() if k != "auth"}, "auth": proof})
        return out

    def __repr__(self) -> str:
        return f"ProducerKey({self.key_id!r}, <secret>)"
