"""Producer keys without a fleet: the key string, single and batch signatures, and what a
verifier accepts (the same functions the workers call)."""

from __future__ import annotations

import base64

import pytest

from producer.auth import BATCH_LEAVES, ProducerKey, verify_signature
from producer.models import AuthProof


def _verifies(public: str, message: dict) -> bool:
    p = message["auth"]
    return verify_signature(
        public, message, p["key_id"], p["ts"], p["nonce"], p["sig"], p.get("index"), p.get("path")
    )


def test_the_key_string_round_trips_and_never_shows_in_repr() -> None:
    key = ProducerKey.generate()
    again = ProducerKey.parse(key.secret())
    assert again.public_key_b64() == key.public_key_b64()
    assert key.secret() not in repr(key) and key.key_id in repr(key)
    with pytest.raises(ValueError, match="ACTIONFLEET_KEY"):
        ProducerKey.parse("afk1_nope")


@pytest.mark.parametrize("n", [2, 3, 8, 9, BATCH_LEAVES, BATCH_LEAVES + 1, 600])
def test_every_member_of_a_signed_batch_verifies_alone(n: int) -> None:
    key = ProducerKey.generate()
    public = key.public_key_b64()
    signed = key.sign_many([{"tenant_id": "acme", "n": i} for i in range(n)])
    assert [m["n"] for m in signed] == list(range(n))
    trees = (n + BATCH_LEAVES - 1) // BATCH_LEAVES
    assert len({m["auth"]["sig"] for m in signed}) == trees
    assert len({m["auth"]["nonce"] for m in signed}) == n
    for message in signed:
        AuthProof.model_validate(message["auth"])
        assert _verifies(public, message)
    first = signed[0]["auth"]
    depth = (min(n, BATCH_LEAVES) - 1).bit_length()
    assert len(base64.urlsafe_b64decode(first["path"] + "==")) == 32 * depth
    # A changed member, a member claiming a sibling's position, a foreign key: refused.
    assert not _verifies(public, {**signed[1], "n": -1})
    assert not _verifies(public, {**signed[0], "auth": {**first, "index": first["index"] ^ 1}})
    assert not _verifies(ProducerKey.generate().public_key_b64(), signed[0])


def test_a_batch_of_one_is_an_ordinary_signature() -> None:
    key = ProducerKey.generate()
    (message,) = key.sign_many([{"tenant_id": "acme"}])
    assert "path" not in message["auth"] and _verifies(key.public_key_b64(), message)


def test_a_batch_proof_needs_both_its_position_and_its_path() -> None:
    key = ProducerKey.generate()
    proof = key.sign_many([{"a": 1}, {"a": 2}])[0]["auth"]
    with pytest.raises(ValueError, match="both index and path"):
        AuthProof.model_validate({k: v for k, v in proof.items() if k != "path"})
    assert not verify_signature(
        key.public_key_b64(), {"a": 1}, proof["key_id"], proof["ts"], proof["nonce"],
        proof["sig"], 4, proof["path"],
    )  # fmt: skip
