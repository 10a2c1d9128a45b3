"""Tool definitions for models, and the two conversions an agent loop needs.

One tool per primitive (``run_code``, ``browse``, ``files``, ``send_email``, ``call_api``).
Each tool's arguments are its primitive's payload (``producer.models``, the one source of
truth: a new payload field is a new tool argument) plus an optional ``idempotency_key``.
The model never names the tenant or the agent: the caller fills them (from its producer
key's scope), so a prompt-injected model cannot act for someone else.

    definitions("openai" | "anthropic" | "mcp")    ready tool definitions
    action_for(name, arguments, tenant_id=..., agent_id=...)   a tool call -> an action
    ToolOutcome.of(result)                         an ActionResult -> what the model reads

A loop is then: send ``definitions(...)`` with the conversation, turn each tool call into
``client.run(action_for(...))``, and hand ``ToolOutcome.of(result)`` back as the tool
result (``examples/agent_loop.py``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from producer.errors import InvalidAction
from producer.models import (
    MAX_MEMORY_MB,
    ActionResult,
    ApiPayload,
    BrowsePayload,
    CodePayload,
    EmailPayload,
    FilesPayload,
)
from producer.validation import parse_action

__all__ = [
    "TOOL_PRIMITIVES",
    "Format",
    "ToolOutcome",
    "action_for",
    "definitions",
    "input_schema",
]

Format = Literal["openai", "anthropic", "mcp"]

_ERRORS = (
    "On failure the result has error.type and error.retryable: validation_error (fix the "
    "named argument), policy_denied (not allowed for you: do not retry, explain or choose "
    "another way), unauthenticated (the caller's key is refused: stop), rate_limited or "
    "quota_exceeded (wait error.details.retry_after_s, or stop), timeout (make it faster "
    "or ask for more time within the limits), resource_exhausted (use less memory or "
    "output), network_blocked (the address is not allowed), upstream_error (the remote "
    "side failed: retry if retryable), not_found, conflict, sandbox_error and "
    "internal_error (retry if retryable)."
)


@dataclass(frozen=True)
class _Tool:
    name: str
    primitive: str
    payload: type[BaseModel]
    description: str


_TOOLS: tuple[_Tool, ...] = (
    _Tool(
        "run_code",
        "code",
        CodePayload,
        "Run a Python or bash program in a fresh, isolated container with no network and "
        "a read-only system; only /tmp and /work are writable, and with workspace 'ro' or "
        "'rw' the tenant's files are at /workspace. Returns exit_code, stdout and stderr "
        "(each capped, *_truncated says when) and usage. A program that exits non-zero "
        "still succeeds as an action: read exit_code. Limits (time, memory up to "
        f"{MAX_MEMORY_MB} MB, CPUs) default to the tenant's policy; asking for more than "
        "the policy allows is refused, not lowered.",
    ),
    _Tool(
        "browse",
        "browse",
        BrowsePayload,
        "Open a web page in a fresh headless browser, optionally run steps (click, fill, "
        "press, select, wait_for, scroll, hover, check, goto), and extract text, markdown, "
        "links, title, html, a screenshot, tables, or named selectors (JSON under "
        "output.data); a PDF gives its text. Every request goes through the tenant's egress "
        "policy: internal and private addresses are refused (denied); third-party "
        "sub-resources outside the tenant's domain list are skipped and listed in "
        "output.blocked.",
    ),
    _Tool(
        "files",
        "files",
        FilesPayload,
        "Read, write, list, stat, delete, mkdir or move files in the tenant's workspace "
        "(paths are relative; nothing outside the workspace can be reached). Writes count "
        "against the tenant's quota; content is text (utf-8) or base64.",
    ),
    _Tool(
        "send_email",
        "email",
        EmailPayload,
        "Send an email through the fleet's relay (at most once per idempotency_key). "
        "Recipients must be allowed by the tenant's policy; attachments are workspace "
        "paths. With dry_run the message is built and checked but not sent.",
    ),
    _Tool(
        "call_api",
        "api",
        ApiPayload,
        "Call an HTTP API. Credentials are named secrets (auth.secret), never values in "
        "the arguments; the fleet adds them. Only hosts the tenant's egress policy allows "
        "can be reached; the response status, headers and body (capped) come back.",
    ),
)

TOOL_PRIMITIVES: dict[str, str] = {t.name: t.primitive for t in _TOOLS}
_BY_NAME = {t.name: t for t in _TOOLS}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every local ``$ref`` replaced by its definition: function-calling
    APIs differ in how much of JSON Schema they follow, and a self-contained object is
    read the same everywhere."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                merged = {
                    **walk(copy.deepcopy(defs[ref.rsplit("/", 1)[1]])),
                    **{k: walk(v) for k, v in node.items() if k != "$ref"},
                }
                return merged
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def input_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments: its payload, plus ``idempotency_key``."""
    tool = _BY_NAME[name]
    schema = _inline_refs(tool.payload.model_json_schema())
    schema.pop("title", None)
    schema["properties"]["idempotency_key"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "description": "the same key for a retry of the same intent: it runs at most once",
    }
    schema["additionalProperties"] = False
    return schema


_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "action_id": {"type": "string"},
        "status": {
            "type": "string",
            "enum": [
                "succeeded",
                "failed",
                "denied",
                "timed_out",
                "expired",
                "invalid",
                "awaiting_approval",
            ],
        },
        "output": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]},
    },
    "required": ["action_id", "status"],
}


def definitions(fmt: Format) -> list[dict[str, Any]]:
    """The five tools, ready for ``fmt``: OpenAI chat-completions function tools,
    Anthropic tools, or MCP tools (with an output schema)."""
    out: list[dict[str, Any]] = []
    for tool in _TOOLS:
        description = f"{tool.description} {_ERRORS}"
        schema = input_schema(tool.name)
        if fmt == "openai":
            out.append(
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": description,
                        "parameters": schema,
                    },
                }
            )
        elif fmt == "anthropic":
            out.append({"name": tool.name, "description": description, "input_schema": schema})
        elif fmt == "mcp":
            out.append(
                {
                    "name": tool.name,
                    "description": description,
                    "inputSchema": schema,
                    "outputSchema": _OUTPUT_SCHEMA,
                }
            )
        else:
            raise ValueError(f"format must be openai, anthropic or mcp, not {fmt!r}")
    return out


def action_for(
    name: str,
    arguments: dict[str, Any] | str,
    *,
    tenant_id: str,
    agent_id: str,
    user_id: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The validated action message of a model's tool call. ``arguments`` may be the JSON
    text a model produced. Raises ``InvalidAction`` whose fields name the tool's arguments
    (``source``, not ``payload.source``), so the model can fix them."""
    tool = _BY_NAME.get(name)
    if tool is None:
        raise InvalidAction(
            [
                {
                    "field": "name",
                    "reason": f"no tool {name!r}",
                    "fix": f"use one of {list(_BY_NAME)}",
                }
            ]
        )
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError as exc:
            raise InvalidAction(
                [{"field": "arguments", "reason": f"not JSON: {exc}", "fix": "send a JSON object"}]
            ) from None
    if not isinstance(arguments, dict):
        raise InvalidAction(
            [{"field": "arguments", "reason": "not an object", "fix": "send a JSON object"}]
        )
    payload = {k: v for k, v in arguments.items() if k != "idempotency_key"}
    raw: dict[str, Any] = {
        "primitive": tool.primitive,
        "tenant_id": tenant_id,
        "agent_id": agent_id,
        "payload": payload,
    }
    if user_id:
        raw["user_id"] = user_id
    if labels:
        raw["labels"] = labels
    if "idempotency_key" in arguments:
        raw["idempotency_key"] = arguments["idempotency_key"]
    try:
        action = parse_action(raw)
    except InvalidAction as exc:
        errors = [
            {**e, "field": e["field"].removeprefix("payload.").removeprefix("payload")}
            for e in exc.errors
        ]
        raise InvalidAction([{**e, "field": e["field"] or "arguments"} for e in errors]) from None
    except ValidationError as exc:  # pragma: no cover - parse_action converts these
        raise InvalidAction([{"field": "arguments", "reason": str(exc), "fix": ""}]) from None
    return action.model_dump(mode="json", by_alias=True, exclude_none=True)


class ToolOutcome(BaseModel):
    """What the model reads back: a short text, the structured result, whether it failed."""

    is_error: bool
    text: str
    structured: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, result: ActionResult) -> ToolOutcome:
        data = result.model_dump(mode="json", include={"action_id", "status", "output", "error"})
        if result.ok:
            return cls(is_error=False, text=_summary(result), structured=data)
        err = result.error
        text = (
            f"{result.status}: {err.type}: {err.message} (retryable: {str(err.retryable).lower()})"
            if err is not None
            else result.status
        )
        return cls(is_error=True, text=text, structured=data)

    @classmethod
    def invalid(cls, exc: InvalidAction) -> ToolOutcome:
        """A tool call that never became an action: the fields to fix."""
        error = {
            "type": "validation_error",
            "message": str(exc),
            "retryable": False,
            "details": {"errors": exc.errors},
        }
        return cls(
            is_error=True,
            text="invalid arguments: "
            + "; ".join(f"{e['field']}: {e['reason']}" for e in exc.errors),
            structured={"action_id": "", "status": "invalid", "output": None, "error": error},
        )

    def openai_message(self, tool_call_id: str) -> dict[str, Any]:
        """A chat-completions ``tool`` message."""
        return {"role": "tool", "tool_call_id": tool_call_id, "content": self._content()}

    def anthropic_block(self, tool_use_id: str) -> dict[str, Any]:
        """An Anthropic ``tool_result`` content block."""
        return {
            "type": "tool_result",
            "tool_use_id": tool_use_id,
            "content": self._content(),
            "is_error": self.is_error,
        }

    def _content(self) -> str:
        return self.text + "\n" + json.dumps(self.structured, ensure_ascii=False)


def _summary(result: ActionResult) -> str:
    out = result.output or {}
    if result.primitive == "code":
        stdout = str(out.get("stdout", ""))
        return f"exit {out.get('exit_code')}; stdout: {stdout[:500]}"
    return f"{result.status} in {result.duration_ms} ms"
