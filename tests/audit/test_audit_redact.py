"""Redaction and event-shape rules (pure functions, no services)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

from audit.events import pack, uuid7, validate
from audit.redact import MASK, redact, scrub

SECRET = "s3cr3t-Value/with+chars"


def test_sensitive_fields_are_masked_at_any_depth() -> None:
    payload = {
        "headers": {"Authorization": "Bearer abc", "X-Api-Key": "k1", "Accept": "json"},
        "auth": {"password": "hunter2", "user": "bob"},
        "cookie": ["a=1"],
        "access_token": "t0k",
        "max_tokens": 256,  # a name that only contains "token" is not a secret
    }
    red = redact(payload)
    data = json.loads(red.preview)
    assert data["headers"] == {"Authorization": MASK, "X-Api-Key": MASK, "Accept": "json"}
    assert data["auth"] == {"password": MASK, "user": "bob"}
    assert data["cookie"] == MASK and data["access_token"] == MASK
    assert data["max_tokens"] == 256
    for value in ("abc", "k1", "hunter2", "t0k", "a=1"):
        assert value not in red.preview


def test_secret_values_are_masked_everywhere_in_every_spelling() -> None:
    b64 = base64.b64encode(SECRET.encode()).decode().rstrip("=")
    payload = {
        "note": f"the key is {SECRET}!",
        SECRET: "as a key",
        "list": [1, {"deep": f"Basic {b64}"}],
        "url": "https://x.test/?k=" + "s3cr3t-Value%2Fwith%2Bchars",
    }
    red = redact(payload, [SECRET])
    for spelling in (SECRET, b64, "s3cr3t-Value%2Fwith%2Bchars"):
        assert spelling not in red.preview
    assert red.preview.count(MASK) == 4
    assert scrub(f"failed with {SECRET}", [SECRET]) == f"failed with {MASK}"
    assert redact({"pin": 4321}, ["4321"]).preview == '{"pin":"[REDACTED]"}'


def test_no_secret_fast_path_redacts_like_the_scrubbing_walk() -> None:
    # Without secrets in play redact() takes a walk that skips the scrubber; with a secret
    # that occurs nowhere it takes the full one. Both must write the same bytes.
    payload = {
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "items": [1, 2.5, None, True, ("t", b"raw \xff bytes"), {"password": 1}],
        "set": frozenset({"only"}),
        7: "int key",
        "obj": uuid.UUID(int=5),
        "text": "plain é",
    }
    fast = redact(payload)
    full = redact(payload, ["never-appears-anywhere"])
    assert fast == full
    data = json.loads(fast.preview)
    assert data["headers"]["Authorization"] == MASK and data["items"][5] == {"password": MASK}
    assert data["items"][4] == ["t", "raw \ufffd bytes"] and data["7"] == "int key"


def test_large_payloads_are_truncated_and_hashed_in_full() -> None:
    payload = {"stdout": "é" * 10_000}
    red = redact(payload, max_bytes=1_001)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert red.truncated
    assert len(red.preview.encode()) <= 1_001
    red.preview.encode().decode()  # cut on a character boundary
    assert red.size == len(canonical.encode())
    assert red.sha256 == hashlib.sha256(canonical.encode()).hexdigest()
    small = redact({"a": 1}, max_bytes=1_001)
    assert not small.truncated and small.preview == '{"a":1}'


def test_hash_is_over_the_redacted_form() -> None:
    # Equal after redaction, so equal hashes: the hash cannot be used to guess the secret.
    a = redact({"password": "one"})
    b = redact({"password": "two"})
    assert a.sha256 == b.sha256


def test_uuid7_is_time_ordered_and_versioned() -> None:
    ids = [uuid7() for _ in range(5_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}


def test_validate_names_the_problem() -> None:
    good = {
        "event_id": uuid7(),
        "event_time": "2026-11-21 10:00:00.000001",
        "stage": "received",
        "schema_version": 1,
        "attempt": 1,
    }
    assert validate(json.dumps(good).encode())[1] == ""
    cases = {
        b"nope": "not JSON",
        b"[1]": "not a JSON object",
        json.dumps(good | {"stage": "x"}).encode(): "unknown stage",
        json.dumps(good | {"attempt": "1"}).encode(): "'attempt'",
        json.dumps(good | {"event_time": "yesterday"}).encode(): "bad id or time",
        json.dumps({k: v for k, v in good.items() if k != "event_id"}).encode(): "missing",
    }
    for blob, reason in cases.items():
        row, why = validate(blob)
        assert row is None and reason in why, (blob, why)


def test_pack_keeps_every_event_one_per_line() -> None:
    blobs = [json.dumps({"i": i}).encode() for i in range(250)]
    entries = pack(blobs, max_events=100)
    assert len(entries) == 3
    assert [line for e in entries for line in e.split(b"\n")] == blobs
    assert len(pack(blobs, max_events=1_000, max_bytes=100)) > 1
