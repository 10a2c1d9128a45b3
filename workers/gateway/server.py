"""``actionfleet mcp``: the five primitives as MCP tools, the caller's workspace and its
actions as MCP resources, over stdio or streamable HTTP (the official ``mcp`` SDK).

Every tool call becomes an action of the caller's tenant and agent (``identity``), signed
with the caller's own producer key and run by the fleet through ``ActionClient``: the
server holds no key of its own and runs nothing itself. Results come back as structured
content plus a short text; a refused, failed or invalid call is a tool error
(``isError``) whose structured content carries the result's ``error.type``,
``retryable`` and message.

Resources: ``actionfleet://workspace/{path}`` (the tenant's files, listed and read through
``files`` actions, so policy, quotas and audit apply) and ``actionfleet://actions/{id}``
(an action's audit trace, for actions of the caller's tenant only).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

import anyio
import mcp.types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from producer.client import ActionClient
from producer.errors import InvalidAction
from producer.models import ActionResult
from producer.tools import ToolOutcome, action_for, definitions
from workers.gateway.identity import AGENT_HEADER, Caller, Refused, caller_from_bearer

__all__ = ["Gateway"]

WORKSPACE = "actionfleet://workspace/"
ACTIONS = "actionfleet://actions/"
_NOT_FOUND = -32002
_TIMEOUT_S = 300.0
_CALLER_CACHE_S = 1.0
_MAX_RESOURCES = 1_000
_MAX_DIRECTORIES = 100


class Gateway:
    """The MCP server of one process: identities, one ``ActionClient`` per key."""

    def __init__(
        self,
        *,
        stdio_caller: Caller | None = None,
        key_store: Any = None,
        client_factory: Callable[[Caller], ActionClient] | None = None,
        trace: Callable[[str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.stdio_caller = stdio_caller
        self.key_store = key_store
        self.client_factory = client_factory or (lambda caller: ActionClient(key=caller.key))
        self.trace = trace
        self._clients: dict[str, ActionClient] = {}
        self._lock = threading.Lock()
        # Bearer -> caller for a second: a revoked key is refused within it, and a busy
        # client does not cost a key lookup per request.
        self._callers: dict[tuple[str | None, str | None], tuple[float, Caller]] = {}
        self._tools: list[types.Tool] | None = None

    def cached(self, authorization: str | None, agent: str | None) -> Caller | None:
        """The caller resolved for these headers less than a second ago, if any."""
        hit = self._callers.get((authorization, agent))
        if hit is not None and time.monotonic() - hit[0] < _CALLER_CACHE_S:
            return hit[1]
        return None

    def resolve(self, authorization: str | None, agent: str | None) -> Caller:
        """The caller of an HTTP request (``Refused`` when not let in)."""
        hit = self.cached(authorization, agent)
        if hit is not None:
            return hit
        now = time.monotonic()
        caller = caller_from_bearer(authorization, self.key_store, agent)
        if len(self._callers) > 10_000:
            self._callers.clear()
        self._callers[(authorization, agent)] = (now, caller)
        return caller

    # -- who is asking -----------------------------------------------------------------

    def caller(self, ctx: ServerRequestContext) -> Caller:
        request = getattr(ctx, "request", None)
        if request is None:
            if self.stdio_caller is None:
                raise MCPError(-32001, "this server has no identity for stdio clients")
            return self.stdio_caller
        try:
            return self.resolve(
                request.headers.get("authorization"), request.headers.get(AGENT_HEADER)
            )
        except Refused as exc:  # the middleware refuses first; this is the second line
            raise MCPError(-32001, str(exc)) from None

    def client(self, caller: Caller) -> ActionClient:
        with self._lock:
            found = self._clients.get(caller.key_id)
            if found is None:
                found = self._clients[caller.key_id] = self.client_factory(caller)
            return found

    async def run(self, caller: Caller, action: dict[str, Any]) -> ActionResult:
        # No thread per call: the result is awaited on the event loop's one subscription.
        return await self.client(caller).arun(action, timeout=_TIMEOUT_S)

    def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()

    # -- tools ---------------------------------------------------------------------------

    def tools(self) -> list[types.Tool]:
        # Built once: generating the schemas from the contract takes milliseconds.
        if self._tools is None:
            self._tools = [
                types.Tool(
                    name=d["name"],
                    description=d["description"],
                    input_schema=d["inputSchema"],
                    output_schema=d["outputSchema"],
                )
                for d in definitions("mcp")
            ]
        return self._tools

    def input_schema(self, name: str) -> dict[str, Any] | None:
        return next((t.input_schema for t in self.tools() if t.name == name), None)

    async def list_tools(self, ctx: ServerRequestContext, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools())

    async def call_tool(
        self, ctx: ServerRequestContext, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        caller = self.caller(ctx)
        try:
            action = action_for(
                params.name,
                params.arguments or {},
                tenant_id=caller.tenant_id,
                agent_id=caller.agent_id,
            )
        except InvalidAction as exc:
            return _tool_result(ToolOutcome.invalid(exc))
        return _tool_result(ToolOutcome.of(await self.run(caller, action)))

    # -- resources -----------------------------------------------------------------------

    async def _files(self, caller: Caller, payload: dict[str, Any]) -> ActionResult:
        action = action_for("files", payload, tenant_id=caller.tenant_id, agent_id=caller.agent_id)
        return await self.run(caller, action)

    async def list_resources(
        self, ctx: ServerRequestContext, params: Any
    ) -> types.ListResourcesResult:
        caller = self.caller(ctx)
        resources: list[types.Resource] = []
        pending, listed = [""], 0
        # A bounded walk: each directory is one files action through the fleet.
        while pending and len(resources) < _MAX_RESOURCES and listed < _MAX_DIRECTORIES:
            directory = pending.pop()
            listed += 1
            result = await self._files(caller, {"op": "list", "path": directory or "."})
            if not result.ok:
                if directory == "":  # no workspace yet, or not allowed: nothing to show
                    break
                continue
            for entry in (result.output or {}).get("entries", []):
                path = f"{directory}/{entry['name']}" if directory else entry["name"]
                if entry.get("type") == "dir":
                    pending.append(path)
                elif entry.get("type") == "file":
                    resources.append(
                        types.Resource(
                            uri=WORKSPACE + quote(path),
                            name=path,
                            mime_type="text/plain",
                            size=entry.get("size"),
                        )
                    )
        return types.ListResourcesResult(resources=resources)

    async def list_resource_templates(
        self, ctx: ServerRequestContext, params: Any
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(
            resource_templates=[
                types.ResourceTemplate(
                    uri_template=WORKSPACE + "{path}",
                    name="workspace file",
                    description="a file of your tenant's workspace",
                    mime_type="text/plain",
                ),
                types.ResourceTemplate(
                    uri_template=ACTIONS + "{id}",
                    name="action trace",
                    description="every audited stage of one of your tenant's actions",
                    mime_type="application/json",
                ),
            ]
        )

    async def read_resource(
        self, ctx: ServerRequestContext, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        caller = self.caller(ctx)
        uri = str(params.uri)
        if uri.startswith(WORKSPACE):
            path = unquote(uri.removeprefix(WORKSPACE))
            result = await self._files(caller, {"op": "read", "path": path})
            if not result.ok or result.output is None:
                message = result.error.message if result.error else result.status
                raise MCPError(_NOT_FOUND, f"cannot read {path!r}: {message}", {"uri": uri})
            out = result.output
            if out.get("encoding") == "base64":
                contents: Any = types.BlobResourceContents(
                    uri=uri, mime_type="application/octet-stream", blob=out["content"]
                )
            else:
                contents = types.TextResourceContents(
                    uri=uri, mime_type="text/plain", text=out["content"]
                )
            return types.ReadResourceResult(contents=[contents])
        if uri.startswith(ACTIONS) and self.trace is not None:
            action_id = uri.removeprefix(ACTIONS)
            rows = await anyio.to_thread.run_sync(lambda: self.trace(action_id))  # type: ignore[misc]
            rows = [r for r in rows if r.get("tenant_id") == caller.tenant_id]
            if not rows:  # none, or another tenant's: the same answer
                raise MCPError(_NOT_FOUND, f"no action {action_id} of yours", {"uri": uri})
            text = json.dumps(rows, default=str, ensure_ascii=False)
            return types.ReadResourceResult(
                contents=[
                    types.TextResourceContents(uri=uri, mime_type="application/json", text=text)
                ]
            )
        raise MCPError(_NOT_FOUND, f"no resource {uri}", {"uri": uri})

    # -- the server ----------------------------------------------------------------------

    def server(self) -> Server:
        return Server(
            "actionfleet",
            version="0.1.0",
            instructions="Act through ActionFleet: run code, browse, files, send email, call "
            "APIs, each sandboxed, policy-checked and audited, as your tenant.",
            get_tool_input_schema=self.input_schema,
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
            on_list_resources=self.list_resources,
            on_list_resource_templates=self.list_resource_templates,
            on_read_resource=self.read_resource,
        )


def _tool_result(outcome: ToolOutcome) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=outcome.text)],
        structured_content=outcome.structured,
        is_error=outcome.is_error,
    )
