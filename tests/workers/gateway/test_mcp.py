"""``actionfleet mcp`` with real MCP client sessions of the official SDK, against a real
files worker that requires signed actions: over stdio (the server's own key, tenant and
agent) and over streamable HTTP (each client's producer key as a bearer token)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
import redis

from producer.auth import ProducerKey
from tests.browse_fixtures import Site, require_chromium
from tests.conftest import ROOT, RedisServer, Worker, start_worker, worker_env
from tests.http_peer import json_peer
from workers.auth.keys import KeyStore
from workers.ops.fleet import free_port

pytestmark = pytest.mark.timeout(300)

DB = 0  # this module's own Redis database
WRITE = {"op": "write", "path": "notes/a.txt", "content": "from the model"}


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, dict[str, str]]]:
    redis_server.client(DB).flushdb()
    home = tmp_path_factory.mktemp("mcp-fleet")
    url = redis_server.url(DB)
    worker: Worker = start_worker(
        url, home, queues="actions.files", concurrency=2, auth="required",
        workspace_root=str(home / "ws"),
    )  # fmt: skip
    store = KeyStore(redis.Redis.from_url(url))
    keys = {
        "acme": store.create("acme", "desk-*", ["files"])[1].secret(),
        "beta": store.create("beta", "platform-agent", ["files"])[1].secret(),
    }
    yield url, home, keys
    worker.stop()


def _stdio_params(url: str, home: Path, key: str, tenant: str, agent: str) -> Any:
    from mcp import StdioServerParameters

    env = worker_env(url, home) | {"ACTIONFLEET_KEY": key}
    env.pop("ACTIONFLEET_AUTH", None)
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "workers.ops.cli", "mcp", "--tenant", tenant, "--agent", agent],
        env=env,
        cwd=str(ROOT),
    )


def test_over_stdio_the_tools_run_through_the_fleet(
    fleet: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    from mcp import ClientSession, stdio_client

    url, home, keys = fleet
    seen: dict[str, Any] = {}

    async def session() -> None:
        params = _stdio_params(url, tmp_path, keys["acme"], "acme", "desk-1")
        with (tmp_path / "server.err").open("w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                seen["tools"] = (await s.list_tools()).tools
                seen["write"] = await s.call_tool("files", WRITE)
                seen["read"] = await s.call_tool("files", {"op": "read", "path": "notes/a.txt"})
                seen["bad"] = await s.call_tool("files", {"op": "explode", "path": "x"})
                seen["resources"] = (await s.list_resources()).resources
                seen["templates"] = (await s.list_resource_templates()).resource_templates
                seen["file"] = await s.read_resource("actionfleet://workspace/notes/a.txt")

    anyio.run(session)
    tools = {t.name: t for t in seen["tools"]}
    assert set(tools) == {"run_code", "browse", "files", "send_email", "call_api"}
    jsonschema.validate(WRITE, tools["files"].input_schema)
    jsonschema.validate(
        {"language": "python", "source": "print(1)"}, tools["run_code"].input_schema
    )
    write = seen["write"]
    assert not write.is_error and write.structured_content["status"] == "succeeded", write
    assert (home / "ws" / "acme" / "notes" / "a.txt").read_text() == "from the model"
    read = seen["read"]
    assert read.structured_content["output"]["content"] == "from the model"
    bad = seen["bad"]
    assert bad.is_error and bad.structured_content["error"]["type"] == "validation_error"
    assert bad.structured_content["error"]["details"]["errors"][0]["field"] == "op"
    assert [r.name for r in seen["resources"]] == ["notes/a.txt"]
    assert {t.uri_template for t in seen["templates"]} == {
        "actionfleet://workspace/{path}",
        "actionfleet://actions/{id}",
    }
    assert seen["file"].contents[0].text == "from the model"


def test_over_stdio_a_key_outside_its_scope_gets_the_fleets_refusal(
    fleet: tuple[str, Path, dict[str, str]], tmp_path: Path
) -> None:
    from mcp import ClientSession, stdio_client

    url, home, keys = fleet
    seen: dict[str, Any] = {}

    async def session() -> None:
        params = _stdio_params(url, tmp_path, keys["acme"], "beta", "desk-1")  # not acme's
        with (tmp_path / "server.err").open("w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                seen["denied"] = await s.call_tool("files", {"op": "list", "path": "."})

    anyio.run(session)
    denied = seen["denied"]
    assert denied.is_error and denied.structured_content["status"] == "denied"
    assert denied.structured_content["error"]["type"] == "policy_denied"
    assert not (home / "ws" / "beta").exists()


@pytest.fixture(scope="module")
def http_server(
    fleet: tuple[str, Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    url, _, _ = fleet
    home = tmp_path_factory.mktemp("mcp-http")
    port = free_port()
    env = worker_env(url, home) | {"ACTIONFLEET_ADMIN_URL": url}
    env.pop("ACTIONFLEET_AUTH", None)
    log = (home / "mcp.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "mcp", "--http", f"127.0.0.1:{port}"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (home / "mcp.log").read_text()
        try:
            httpx.post(endpoint, json={}, timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, (home / "mcp.log").read_text()
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(15)
    log.close()


def _rpc(endpoint: str, token: str | None) -> httpx.Response:
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    return httpx.post(endpoint, json=body, headers=headers, timeout=10)


def test_over_http_a_client_without_a_valid_key_is_refused_before_anything_runs(
    http_server: str,
) -> None:
    for token in (None, "not-a-key", ProducerKey.generate().secret()):
        response = _rpc(http_server, token)
        assert response.status_code == 401, (token, response.text)
        error = response.json()["error"]
        assert error["code"] == -32001 and error["data"]["type"] == "unauthenticated"
        assert token is None or token not in response.text  # never echoes a key


def test_over_http_a_session_serves_only_the_key_and_agent_that_opened_it(
    fleet: tuple[str, Path, dict[str, str]], http_server: str
) -> None:
    _, _, keys = fleet
    accept = {"Accept": "application/json, text/event-stream"}

    def headers(key: str, agent: str | None, session: str | None = None) -> dict[str, str]:
        out = accept | {"Authorization": f"Bearer {key}"}
        if agent:
            out["X-ActionFleet-Agent"] = agent
        if session:
            out["Mcp-Session-Id"] = session
            out["Mcp-Protocol-Version"] = "2025-06-18"
        return out

    init = {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "1"}},
    }  # fmt: skip
    opened = httpx.post(http_server, json=init, headers=headers(keys["acme"], "desk-1"))
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}

    def list_as(key: str, agent: str | None) -> httpx.Response:
        return httpx.post(http_server, json=listing, headers=headers(key, agent, session))

    assert list_as(keys["acme"], "desk-1").status_code == 200
    # Another tenant's key, or the same key as another agent: the session does not exist.
    assert list_as(keys["beta"], None).status_code == 404
    assert list_as(keys["acme"], "desk-2").status_code == 404
    assert list_as(keys["acme"], "desk-1").status_code == 200


def test_over_http_each_tenant_sees_only_its_own_workspace(
    fleet: tuple[str, Path, dict[str, str]], http_server: str
) -> None:
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    _, home, keys = fleet
    seen: dict[str, Any] = {}

    async def as_client(name: str, agent: str | None, calls: list[dict[str, Any]]) -> None:
        headers = {"Authorization": f"Bearer {keys[name]}"}
        if agent:
            headers["X-ActionFleet-Agent"] = agent
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            streamable_http_client(http_server, http_client=http) as (read, write),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            for args in calls:
                result = await s.call_tool("files", args)
                assert not result.is_error, result
            seen[name] = sorted(r.name for r in (await s.list_resources()).resources)

    async def both() -> None:
        await as_client("acme", "desk-9", [{"op": "write", "path": "acme.txt", "content": "a"}])
        await as_client("beta", None, [{"op": "write", "path": "beta.txt", "content": "b"}])

    anyio.run(both)
    assert "acme.txt" in seen["acme"] and "beta.txt" not in seen["acme"]
    assert seen["beta"] == ["beta.txt"]
    assert (home / "ws" / "beta" / "beta.txt").read_text() == "b"
    # The agent comes from the key (beta's names one), or a header inside its pattern.
    response = _rpc(http_server, keys["acme"])  # acme's key covers desk-*, no header
    assert response.status_code == 401 and "X-ActionFleet-Agent" in json.dumps(response.json())


# ------------------------------------------------------------- every tool, end to end

TOOLS_DB = 3  # the all-primitives fleet's own Redis database


@pytest.fixture(scope="module")
def tools_fleet(
    redis_server: RedisServer, sandbox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, int]]:
    require_chromium()
    redis_server.client(TOOLS_DB).flushdb()
    home = tmp_path_factory.mktemp("mcp-tools")
    url = redis_server.url(TOOLS_DB)
    worker = start_worker(
        url, home, queues="actions.code,actions.browse,actions.email,actions.api", concurrency=2,
        auth="required", sandbox_runtime="runc", workspace_root=str(home / "ws"),
    )  # fmt: skip
    # apitest: the test policy's tenant that may reach loopback servers (and sites).
    key = KeyStore(redis.Redis.from_url(url)).create("apitest", "desk-*")[1].secret()
    with json_peer() as port:
        yield url, key, port
    worker.stop()


def test_over_stdio_code_browse_email_and_api_tools_run_end_to_end(
    tools_fleet: tuple[str, str, int], site: Site, tmp_path: Path
) -> None:
    from mcp import ClientSession, stdio_client

    url, key, port = tools_fleet
    seen: dict[str, Any] = {}

    async def session() -> None:
        params = _stdio_params(url, tmp_path, key, "apitest", "desk-1")
        with (tmp_path / "server.err").open("w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                seen["code"] = await s.call_tool(
                    "run_code", {"language": "python", "source": "print(6 * 7)"}
                )
                seen["browse"] = await s.call_tool(
                    "browse", {"url": site.url("/about"), "extract": ["title", "markdown"]}
                )
                seen["email"] = await s.call_tool(
                    "send_email",
                    {"to": ["ops@example.com"], "subject": "hi", "text": "x", "dry_run": True},
                )
                seen["api"] = await s.call_tool(
                    "call_api", {"method": "GET", "url": f"http://127.0.0.1:{port}/ping"}
                )

    anyio.run(session)
    code = seen["code"]
    assert not code.is_error, code
    assert code.structured_content["output"]["stdout"] == "42\n"
    assert "42" in code.content[0].text
    browse = seen["browse"]
    assert not browse.is_error, browse
    assert browse.structured_content["output"]["title"] == "About"
    assert "We test browsers." in browse.structured_content["output"]["markdown"]
    email = seen["email"]
    assert not email.is_error and email.structured_content["output"]["dry_run"] is True, email
    api = seen["api"]
    assert not api.is_error, api
    assert api.structured_content["output"]["status"] == 200
