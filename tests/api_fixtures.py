"""Fixtures for the api tests: a real HTTP server on loopback, a real in-process
``ApiExecutor`` with a real directory secret store, and the real pipeline to run actions.

Host names are mapped by a resolver the tests control (``StaticResolver``); nothing
resolves via DNS. Module-scoped fixtures, so each test module gets its own server (some
tests count requests per path).
"""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import TEST_POLICY
from workers.executors.api import ApiExecutor
from workers.middleware import ActionContext, Middleware
from workers.outbound.egress import StaticResolver
from workers.outbound.secrets import ChainSecretStore, DirSecretStore, EnvSecretStore
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine

SECRET = "ghs_TopSecretValue-0123456789abcdef"
RESOLVER = StaticResolver(
    {
        "api.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "internal.test": ["10.0.0.1"],
        "mixed.test": ["127.0.0.1", "169.254.169.254"],
    }
)


# ------------------------------------------------------------------ the test server


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class ApiServer:
    port: int
    requests: list[Seen] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]


def _handler(server: ApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json", **h: str):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "session=abc")  # must never reach the agent
            for k, v in h.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body
            )
            server.requests.append(seen)
            n = server.counters[parts.path] = server.counters.get(parts.path, 0) + 1
            q = seen.query
            if parts.path == "/echo":
                out = {
                    "method": self.command,
                    "query": {k: v[0] for k, v in q.items()},
                    "headers": seen.headers,
                    "body": body.decode(),
                }
                self._send(200, json.dumps(out).encode(), ETag='"v1"')
            elif parts.path == "/redirect":
                code = int(q.get("code", ["302"])[0])
                self._send(code, b"", "text/plain", Location=q["to"][0])
            elif parts.path == "/leaky-redirect":
                # A careless server echoing the credential into a redirect to a blocked host:
                # the refusal message names that URL, so the secret must be scrubbed there.
                token = self.headers.get("Authorization", "").split(" ")[-1]
                self._send(302, b"", "text/plain", Location=f"http://internal.test/{token}")
            elif parts.path == "/flaky":
                if n <= 2:
                    self._send(503, b'{"error":"busy"}')
                else:
                    self._send(200, b'{"ok":true}')
            elif parts.path == "/ratelimited":
                if n == 1:
                    self._send(429, b'{"error":"slow down"}', Retry_After="1")
                else:
                    self._send(200, b'{"ok":true}')
            elif parts.path == "/down":
                self._send(503, b'{"error":"down"}')
            elif parts.path == "/always429":
                self._send(429, b"{}", Retry_After="3600")
            elif parts.path == "/reset":
                # Headers promise 100 bytes; 7 arrive, then the connection is reset.
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                self.wfile.flush()
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
            elif parts.path == "/bomb":
                self._send(
                    200, gzip.compress(b"\0" * (20 << 20)), "text/plain", Content_Encoding="gzip"
                )
            elif parts.path == "/gzip":
                self._send(200, gzip.compress(b'{"packed":true}'), Content_Encoding="gzip")
            elif parts.path == "/big":
                self._send(200, b"x" * (2 << 20), "text/plain")
            elif parts.path == "/notfound":
                self._send(404, b'{"error":"no such thing"}')
            else:
                self._send(404, b"{}")

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    return Handler


@pytest.fixture(scope="module")
def api_server() -> Iterator[ApiServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), None)  # type: ignore[arg-type]
    state = ApiServer(httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(state)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield state
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------ running actions


class _Registry:
    def __init__(self, executor: ApiExecutor) -> None:
        self.executor = executor

    def supports(self, primitive: str) -> bool:
        return primitive == "api"

    def get(self, primitive: str) -> ApiExecutor:
        return self.executor

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("secrets")
    (d / "gh").write_text(SECRET + "\n")
    (d / "gh.meta.json").write_text(json.dumps({"hosts": ["api.test"]}))
    (d / "unbound").write_text("unbound-secret-value-42")
    return d


@pytest.fixture(scope="module")
def executor(secrets_dir: Path) -> ApiExecutor:
    store = ChainSecretStore([DirSecretStore(secrets_dir), EnvSecretStore({})])
    return ApiExecutor(store, resolver=RESOLVER)


def api_action(url: str, tenant: str = "apitest", **payload: Any) -> dict[str, Any]:
    return {
        "primitive": "api",
        "tenant_id": tenant,
        "agent_id": "tester",
        "action_id": str(uuid.uuid4()),
        "payload": {"url": url, **payload},
    }


def run(
    executor: ApiExecutor, raw: dict[str, Any], middleware: list[Middleware] | None = None
) -> dict[str, Any]:
    pipeline = Pipeline(PolicyEngine(TEST_POLICY), _Registry(executor), middleware or [])  # type: ignore[arg-type]
    ctx = ActionContext("api", "actions.api", "test@localhost", 1, raw)
    return pipeline.run(ctx)
