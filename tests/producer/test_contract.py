"""The message contract and the policy, without any service."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from producer.client import SUPPORTED_PRIMITIVES, validate_action
from producer.errors import InvalidAction, PolicyDenied, UnsupportedPrimitive
from producer.models import MAX_SOURCE_BYTES, PRIMITIVES, action_json_schema
from tests.conftest import TEST_POLICY, code_action
from workers.executors import EXECUTOR_FACTORIES
from workers.policy import PolicyEngine, load_policy


def test_valid_code_action_gets_ids_and_defaults() -> None:
    action = validate_action(code_action("print(1)"))
    assert action.primitive == "code"
    assert len(action.action_id) == 36
    assert action.idempotency_key == action.action_id
    assert action.payload.workspace == "none"


def _fields(raw: object) -> set[str]:
    with pytest.raises(InvalidAction) as info:
        validate_action(raw)
    return {e["field"] for e in info.value.errors}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda a: a.pop("tenant_id"), "tenant_id"),
        (lambda a: a["payload"].pop("source"), "payload.source"),
        (lambda a: a.update(priority="high"), "priority"),
        (lambda a: a.update(priority=10), "priority"),
        (lambda a: a["payload"].update(language="ruby"), "payload.language"),
        (lambda a: a.update(primitive="teleport"), "primitive"),
        (lambda a: a.update(colour="red"), "colour"),
        (lambda a: a["payload"].update(shell=True), "payload.shell"),
        (lambda a: a["payload"].update(source="x" * (MAX_SOURCE_BYTES + 1)), "payload.source"),
        (lambda a: a["payload"].update(timeout_s=10**9), "payload.timeout_s"),
        (lambda a: a["payload"].update(timeout_s=-1), "payload.timeout_s"),
        (lambda a: a["payload"].update(memory_mb=10**7), "payload.memory_mb"),
        (lambda a: a.update(action_id="not-a-uuid"), "action_id"),
        (lambda a: a.update(tenant_id="../etc"), "tenant_id"),
        (lambda a: a.update(deadline="2026-01-01T00:00:00"), "deadline"),
        (lambda a: a.update(labels={f"k{i}": "v" for i in range(40)}), "labels"),
    ],
)
def test_invalid_messages_name_the_field(mutate, field: str) -> None:
    raw = code_action("print(1)")
    mutate(raw)
    errors = _fields(raw)
    assert field in errors, errors


def test_every_error_has_a_reason_and_a_fix() -> None:
    raw = code_action("print(1)", timeout_s="soon", memory_mb=1)
    with pytest.raises(InvalidAction) as info:
        validate_action(raw)
    for e in info.value.errors:
        assert e["reason"] and e["fix"], e


def test_non_json_and_non_object_input() -> None:
    assert _fields("{not json") == {"(message)"}
    assert _fields("[1, 2]") == {"(message)"}


def test_all_primitives_validate_but_unsupported_are_refused() -> None:
    samples = {
        "browse": {"url": "https://example.com"},
        "files": {"op": "read", "path": "a.txt"},
        "email": {"to": ["a@example.com"], "subject": "hi", "text": "x"},
        "api": {"method": "GET", "url": "https://example.com", "auth": {"secret": "gh"}},
    }
    for primitive, payload in samples.items():
        raw = {"primitive": primitive, "tenant_id": "t", "agent_id": "a", "payload": payload}
        assert validate_action(raw, PRIMITIVES).primitive == primitive
        if primitive in SUPPORTED_PRIMITIVES:  # has an executor now
            assert validate_action(raw).primitive == primitive
            continue
        with pytest.raises(UnsupportedPrimitive) as info:
            validate_action(raw)
        assert info.value.errors[0]["field"] == "primitive"


def test_client_and_worker_agree_on_supported_primitives() -> None:
    assert set(SUPPORTED_PRIMITIVES) == set(EXECUTOR_FACTORIES)


def test_schema_command_prints_the_union() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "schema"], capture_output=True, text=True, check=True
    )
    schema = json.loads(out.stdout)
    assert schema == json.loads(json.dumps(action_json_schema()))
    assert set(schema["discriminator"]["mapping"]) == set(PRIMITIVES)


def test_policy_merges_tenant_over_default_and_denies_above_ceiling() -> None:
    engine = PolicyEngine(TEST_POLICY)
    grant = engine.authorize(validate_action(code_action("print(1)")))
    assert grant.limits is not None
    assert (grant.limits.memory_mb, grant.limits.timeout_s, grant.limits.pids) == (128, 20, 64)

    small = code_action("print(1)", memory_mb=128) | {"tenant_id": "small"}
    with pytest.raises(PolicyDenied) as info:
        engine.authorize(validate_action(small))
    assert "64MB" in info.value.message and info.value.details["limit"] == 64

    nocode = code_action("print(1)") | {"tenant_id": "nocode"}
    with pytest.raises(PolicyDenied, match="may not use primitive 'code'"):
        engine.authorize(validate_action(nocode))


def test_broken_policy_file_is_refused_at_load(tmp_path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("version: 1\ntenants:\n  x:\n    code: {max_memory_mb: 'lots'}\n")
    with pytest.raises(ValueError, match="invalid"):
        load_policy(bad)


def test_cli_submit_invalid_exits_2_without_a_broker(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ACTIONFLEET_HOME": str(tmp_path)}
    raw = json.dumps(code_action("print(1)", memory_mb=10**7))
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", raw],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "invalid"
    assert result["error"]["details"]["errors"][0]["field"] == "payload.memory_mb"
