"""Serving the gateway: stdio for a desktop agent, streamable HTTP for a platform.

Over HTTP every request must carry a producer key (``Authorization: Bearer afk1_…``) that
the fleet knows and that names one tenant; anything else is answered 401 before the MCP
layer sees it, as a JSON-RPC error (code -32001, ``data.type: unauthenticated``) that MCP
clients pass on. The app is stateless (each request stands alone, so a session cannot be
carried over from one key to another) and bound to loopback unless told otherwise; the
SDK refuses a Host header that is not the bound address (DNS rebinding).
"""

from __future__ import annotations

import json
from typing import Any

import anyio

from workers.gateway.identity import AGENT_HEADER, Refused
from workers.gateway.server import Gateway

__all__ = ["http_app", "run_http", "run_stdio"]


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
            try:
                await anyio.to_thread.run_sync(
                    lambda: self.gateway.resolve(
                        headers.get("authorization"), headers.get(AGENT_HEADER)
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
        await self.app(scope, receive, send)


def http_app(gateway: Gateway, host: str = "127.0.0.1") -> Any:
    app = gateway.server().streamable_http_app(
        streamable_http_path="/mcp", stateless_http=True, json_response=True, host=host
    )
    return _BearerGate(app, gateway)


def run_http(gateway: Gateway, host: str, port: int) -> None:
    import uvicorn

    try:
        uvicorn.run(http_app(gateway, host), host=host, port=port, log_level="warning")
    finally:
        gateway.close()
