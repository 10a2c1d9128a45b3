"""A complete agent loop on the fleet, driven by a scripted stand-in for a model.

The stand-in answers like a model API with tool use: it is given the tool definitions
(``producer.tools.definitions("anthropic")``) and the conversation, and returns either tool
calls or a final text. A real model (the Anthropic or OpenAI SDK) takes its place without
changing the loop: only ``ScriptedModel.respond`` is replaced. Nothing here reaches the
network: the fleet is reached at ACTIONFLEET_BROKER_URL (or the fleet of this home).

    .venv/bin/python examples/agent_loop.py            # against `actionfleet up`

The loop: call the model; for each tool call, ``action_for`` turns it into an action of
this agent's tenant (never the model's choice), ``client.run`` runs it, ``ToolOutcome``
turns the result into a tool result; repeat until the model answers in text.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from producer.client import ActionClient
from producer.errors import InvalidAction
from producer.tools import ToolOutcome, action_for, definitions

TENANT = os.environ.get("EXAMPLE_TENANT", "acme")
AGENT = os.environ.get("EXAMPLE_AGENT", "example-agent")


@dataclass
class ScriptedModel:
    """Plays a model: a fixed plan of tool calls, then a summary of what came back."""

    plan: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {
                "name": "files",
                "input": {
                    "op": "write",
                    "path": "notes/plan.txt",
                    "content": "1. measure\n2. report\n",
                },
            },
            {"name": "files", "input": {"op": "read", "path": "notes/plan.txt"}},
            {"name": "files", "input": {"op": "explode", "path": "x"}},  # a bad call
            {"name": "files", "input": {"op": "stat", "path": "notes/plan.txt"}},
        ]
    )

    def respond(self, tools: list[dict[str, Any]], messages: list[dict[str, Any]]) -> dict:
        """Anthropic-shaped: {"stop_reason": "tool_use" | "end_turn", "content": [...]}."""
        assert {t["name"] for t in tools} >= {p["name"] for p in self.plan}
        step = sum(1 for m in messages if m["role"] == "assistant")
        if step < len(self.plan):
            call = self.plan[step]
            block = {"type": "tool_use", "id": f"toolu_{step}", **call}
            return {"stop_reason": "tool_use", "content": [block]}
        results = [
            b
            for m in messages
            if m["role"] == "user" and isinstance(m["content"], list)
            for b in m["content"]
        ]
        failed = sum(1 for b in results if b["is_error"])
        text = f"Done: {len(results)} tool calls, {failed} refused or failed."
        return {"stop_reason": "end_turn", "content": [{"type": "text", "text": text}]}


def run(client: ActionClient, model: ScriptedModel, max_turns: int = 10) -> list[dict]:
    """The loop; returns the conversation."""
    tools = definitions("anthropic")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Write down a plan."}]
    for _ in range(max_turns):
        reply = model.respond(tools, messages)
        messages.append({"role": "assistant", "content": reply["content"]})
        if reply["stop_reason"] != "tool_use":
            return messages
        results = []
        for block in reply["content"]:
            if block["type"] != "tool_use":
                continue
            try:
                action = action_for(block["name"], block["input"], tenant_id=TENANT, agent_id=AGENT)
                outcome = ToolOutcome.of(client.run(action, timeout=120))
            except InvalidAction as exc:  # the model's arguments were wrong: tell it which
                outcome = ToolOutcome.invalid(exc)
            results.append(outcome.anthropic_block(block["id"]))
        messages.append({"role": "user", "content": results})
    raise RuntimeError(f"no answer after {max_turns} turns")


def main() -> int:
    with ActionClient() as client:
        messages = run(client, ScriptedModel())
    for m in messages:
        print(json.dumps(m, ensure_ascii=False))  # the transcript, one message a line
    return 0


if __name__ == "__main__":
    sys.exit(main())
