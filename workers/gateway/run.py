"""Serving the gateway: stdio for a desktop agent, streamable HTTP for a platform.

Over HTTP every request must carry a producer key (``Authorization: Bearer afk1_…``) that
the fleet knows and that names one tenant; anything else is answered 401 before the MCP
layer sees it, as a JSON-RPC error (code -32001, ``data.type: unauthenticated``) that MCP
clients pass on. Sessions are kept (an initialized session serves every later call
without being set up again) and each is bound to the key and agent that opened it: the
gate hands the SDK the caller as the request's authenticated user, and the SDK answers
any other credential presenting that session id as if the session did not exist (404).
Idle sessions end after ``SESSION_IDLE_S``. The server is bound to loopback unless told
otherwise, and the SDK refuses a Host header that is not the bound address (DNS rebinding).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken

from workers.gateway.identity import AGENT_HEADER, Refused
from workers.gateway.server import Gateway

__all__ = ["SESSION_IDLE_S", "http_app", "run_http", "run_stdio"]

SESSION_IDLE_S = 600.0


async def _stdio(gateway: Gateway) -> None:
    from mcp.server.stdio import stdio_server

    server = gateway.server()
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def run_stdio(gateway: Gateway) -> None:
    try:
        anyio.run(_stdio, gateway)
    finally:
        gateway.close()


class _BearerGate:
    """ASGI middleware: a request without a usable producer key never reaches MCP."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            authorization, agent = headers.get("authorization"), headers.get(AGENT_HEADER)
            try:
                caller = self.gateway.cached(authorization, agent) or (
                    await anyio.to_thread.run_sync(
                        lambda: self.gateway.resolve(authorization, agent)
                    )
                )
            except Refused as exc:
                body = json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {
                            "code": -32001,
                            "message": str(exc),
                            "data": {"type": "unauthenticated", "retryable": False},
                        },
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer error="invalid_token"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            # The principal the SDK binds a session to: key and agent (never the secret).
            token = AccessToken(
                token=caller.key_id,
                client_id=caller.key_id,
                subject=f"{caller.tenant_id}/{caller.agent_id}",
                scopes=[],
            )
            scope = {**scope, "user": AuthenticatedUser(token)}
        await self.app(scope, receive, send)


def http_app(gateway: Gateway, host: str = "127.0.0.1") -> Any:
    app = gateway.server().streamable_http_app(
        streamable_http_path="/mcp",
        json_response=True,
        host=host,
        session_idle_timeout=SESSION_IDLE_S,
    )
    return _BearerGate(app, gateway)


def run_http(gateway: Gateway, host: str, port: int) -> None:
    import uvicorn

    try:
        uvicorn.run(http_app(gateway, host), host=host, port=port, log_level="warning")
    finally:
        gateway.close()
