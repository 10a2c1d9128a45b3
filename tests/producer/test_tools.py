"""Tool definitions for model APIs, generated from the payload models: accepted by each
format's own types (the OpenAI, Anthropic and MCP SDKs) and by a JSON Schema validator;
a model's call becomes a valid action of the caller's tenant, a bad one names the
argument to fix; a result becomes what the model reads."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import jsonschema
import pytest
from pydantic import TypeAdapter

from producer.errors import InvalidAction
from producer.models import (
    ActionResult,
    ApiPayload,
    BrowsePayload,
    CodePayload,
    EmailPayload,
    FilesPayload,
)
from producer.tools import TOOL_PRIMITIVES, ToolOutcome, action_for, definitions, input_schema
from tests.conftest import ROOT

EXAMPLES: dict[str, dict[str, Any]] = {
    "run_code": {"language": "python", "source": "print(6 * 7)", "timeout_s": 10},
    "browse": {
        "url": "https://example.org/",
        "steps": [{"action": "click", "selector": "a"}],
        "extract": ["text", "links"],
    },
    "files": {"op": "write", "path": "notes/a.txt", "content": "hi", "idempotency_key": "k1"},
    "send_email": {"to": ["ops@example.com"], "subject": "hi", "text": "x", "dry_run": True},
    "call_api": {"method": "GET", "url": "https://api.example.com/v1", "auth": {"secret": "tok"}},
}
PAYLOADS = {
    "run_code": CodePayload,
    "browse": BrowsePayload,
    "files": FilesPayload,
    "send_email": EmailPayload,
    "call_api": ApiPayload,
}


def test_each_format_is_accepted_by_its_own_sdk_types() -> None:
    import mcp.types
    from anthropic.types import ToolParam
    from openai.types.chat import ChatCompletionFunctionToolParam

    openai_tools = definitions("openai")
    anthropic_tools = definitions("anthropic")
    mcp_tools = definitions("mcp")
    for tool in openai_tools:
        TypeAdapter(ChatCompletionFunctionToolParam).validate_python(tool, strict=True)
    for tool in anthropic_tools:
        TypeAdapter(ToolParam).validate_python(tool, strict=True)
    for tool in mcp_tools:
        parsed = mcp.types.Tool.model_validate(tool)
        assert parsed.input_schema["type"] == "object"
    names = [t["function"]["name"] for t in openai_tools]
    assert names == [t["name"] for t in anthropic_tools] == [t["name"] for t in mcp_tools]
    assert names == ["run_code", "browse", "files", "send_email", "call_api"]


@pytest.mark.parametrize("name", list(TOOL_PRIMITIVES))
def test_schemas_are_valid_self_contained_and_follow_the_payload_models(name: str) -> None:
    schema = input_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "$ref" not in json.dumps(schema)  # every function-calling API reads it the same
    # One source of truth: the arguments are the payload's fields (+ idempotency_key).
    fields = {f.alias or n for n, f in PAYLOADS[name].model_fields.items()}
    assert set(schema["properties"]) == fields | {"idempotency_key"}
    jsonschema.validate(EXAMPLES[name], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**EXAMPLES[name], "tenant_id": "someone-else"}, schema)


@pytest.mark.parametrize("name", list(TOOL_PRIMITIVES))
def test_a_tool_call_becomes_an_action_of_the_callers_tenant(name: str) -> None:
    action = action_for(name, json.dumps(EXAMPLES[name]), tenant_id="acme", agent_id="r-7")
    assert action["primitive"] == TOOL_PRIMITIVES[name]
    assert (action["tenant_id"], action["agent_id"]) == ("acme", "r-7")
    assert "idempotency_key" not in action["payload"]
    if name == "files":
        assert action["idempotency_key"] == "k1"
    uuid.UUID(action["action_id"])


def test_a_bad_tool_call_names_the_argument_to_fix() -> None:
    with pytest.raises(InvalidAction) as bad:
        action_for("files", {"op": "explode", "path": "x"}, tenant_id="acme", agent_id="a")
    assert [e["field"] for e in bad.value.errors] == ["op"]
    with pytest.raises(InvalidAction) as extra:
        action_for("run_code", {"language": "python", "source": "1", "tenant_id": "b"},
                   tenant_id="acme", agent_id="a")  # fmt: skip
    assert [e["field"] for e in extra.value.errors] == ["tenant_id"]
    with pytest.raises(InvalidAction) as unknown:
        action_for("rm_rf", {}, tenant_id="acme", agent_id="a")
    assert unknown.value.errors[0]["field"] == "name"
    with pytest.raises(InvalidAction) as not_json:
        action_for("files", "{op:", tenant_id="acme", agent_id="a")
    assert not_json.value.errors[0]["field"] == "arguments"
    outcome = ToolOutcome.invalid(bad.value)
    assert outcome.is_error and "op:" in outcome.text
    assert outcome.structured["error"]["type"] == "validation_error"


def test_results_become_tool_results() -> None:
    ok = ActionResult(
        action_id="a1", primitive="code", status="succeeded",
        output={"exit_code": 0, "stdout": "42\n", "stderr": ""},
    )  # fmt: skip
    denied = ActionResult(
        action_id="a2", primitive="files", status="denied",
        error={"type": "policy_denied", "message": "files:delete is forbidden", "retryable": False},
    )  # fmt: skip
    good, bad = ToolOutcome.of(ok), ToolOutcome.of(denied)
    assert not good.is_error and "42" in good.text and good.structured["output"]["exit_code"] == 0
    assert bad.is_error and bad.text.startswith("denied: policy_denied: files:delete")
    block = bad.anthropic_block("toolu_1")
    assert block["is_error"] is True and block["tool_use_id"] == "toolu_1"
    message = good.openai_message("call_1")
    assert message["role"] == "tool" and json.loads(message["content"].split("\n", 1)[1])


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "mcp"])
def test_the_tools_command_prints_the_definitions(fmt: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "tools", "--format", fmt],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == definitions(fmt)  # type: ignore[arg-type]
