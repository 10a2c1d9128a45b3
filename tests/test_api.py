"""The api primitive against a real HTTP server on loopback, through the real pipeline.

Every test runs under the tripwire: a socket connecting anywhere but loopback fails the
test, so an SSRF refusal is proven to happen before any packet leaves. Host names are
mapped by a resolver the test controls (``StaticResolver``); nothing resolves via DNS.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.conftest import TEST_POLICY
from workers.egress import StaticResolver
from workers.executors.api import ApiExecutor, idempotency_header_value
from workers.middleware import ActionContext, Middleware
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine
from workers.secrets import ChainSecretStore, DirSecretStore, EnvSecretStore

pytestmark = pytest.mark.usefixtures("tripwire")

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


# ------------------------------------------------------------------ requests


def test_get_with_query_and_headers(executor: ApiExecutor, api_server: ApiServer) -> None:
    r = run(
        executor,
        api_action(api_server.url("/echo?fixed=1"), query={"q": "ä b"}, headers={"X-Trace": "t-1"}),
    )
    assert r["status"] == "succeeded", r
    out = r["output"]
    assert out["status"] == 200 and out["ok"] is True and out["body_format"] == "json"
    assert out["body"]["query"] == {"fixed": "1", "q": "ä b"}
    assert out["body"]["headers"]["X-Trace"] == "t-1"
    assert out["headers"]["etag"] == '"v1"'
    assert "set-cookie" not in out["headers"]  # allowlisted headers only
    assert out["attempts"] == 1 and out["truncated"] is False


def test_post_json_carries_a_derived_idempotency_key(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    raw = api_action(api_server.url("/echo"), method="POST", json={"n": 1, "s": "x"})
    raw["idempotency_key"] = "order-77"
    out = run(executor, raw)["output"]
    assert out["body"]["method"] == "POST"
    assert json.loads(out["body"]["body"]) == {"n": 1, "s": "x"}
    sent = out["body"]["headers"]
    assert sent["Content-Type"] == "application/json"
    assert sent["Idempotency-Key"] == idempotency_header_value("apitest", "order-77")
    assert "order-77" not in sent["Idempotency-Key"]


def test_non_2xx_is_a_response_not_a_failure(executor: ApiExecutor, api_server: ApiServer):
    r = run(executor, api_action(api_server.url("/notfound")))
    assert r["status"] == "succeeded"
    assert (r["output"]["status"], r["output"]["ok"]) == (404, False)
    assert r["output"]["body"] == {"error": "no such thing"}


def test_forbidden_and_crlf_headers_are_refused(executor: ApiExecutor, api_server: ApiServer):
    for headers, field_name in [
        ({"Host": "evil.test"}, "payload.headers.Host"),
        ({"X-A": "v\r\nX-Injected: 1"}, "payload.headers.X-A"),
    ]:
        r = run(executor, api_action(api_server.url("/echo"), headers=headers))
        assert r["status"] == "invalid", r
        assert r["error"]["details"]["field"] == field_name
    assert not any("X-Injected" in s.headers for s in api_server.requests)
    r = run(
        executor,
        api_action(
            api_server.url("/echo", "api.test"),
            auth={"secret": "gh", "scheme": "header", "name": "Host"},
        ),
    )
    assert r["status"] == "invalid" and r["error"]["details"]["field"] == "payload.auth.name"


# ------------------------------------------------------------------ secrets


def test_bearer_secret_injected_but_never_returned(executor: ApiExecutor, api_server: ApiServer):
    r = run(
        executor,
        api_action(api_server.url("/echo", "api.test"), auth={"secret": "gh", "scheme": "bearer"}),
    )
    assert r["status"] == "succeeded", r
    seen = api_server.seen("/echo")[-1]
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"
    assert seen.headers["Host"] == f"api.test:{api_server.port}"  # the name, not the pin
    text = json.dumps(r)
    assert SECRET not in text and "[REDACTED]" in text  # the echo was scrubbed


@pytest.mark.parametrize(
    ("auth", "where"),
    [
        ({"secret": "gh", "scheme": "basic"}, "basic"),
        ({"secret": "gh", "scheme": "header", "name": "X-Api-Key"}, "header"),
        ({"secret": "gh", "scheme": "query", "name": "key"}, "query"),
    ],
)
def test_other_auth_schemes(
    executor: ApiExecutor, api_server: ApiServer, auth: dict[str, str], where: str
) -> None:
    r = run(executor, api_action(api_server.url("/echo", "api.test"), auth=auth))
    assert r["status"] == "succeeded", r
    seen = api_server.seen("/echo")[-1]
    if where == "basic":
        assert (
            seen.headers["Authorization"] == "Basic " + base64.b64encode(SECRET.encode()).decode()
        )
    elif where == "header":
        assert seen.headers["X-Api-Key"] == SECRET
    else:
        assert seen.query["key"] == [SECRET]
    assert SECRET not in json.dumps(r)  # also not in the echoed URL


def test_secret_not_sent_to_another_host_after_redirect(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    target = api_server.url("/echo", "other.test")
    before = len(api_server.requests)
    r = run(
        executor,
        api_action(
            api_server.url(f"/redirect?to={target}", "api.test"),
            auth={"secret": "gh"},
            headers={"Cookie": "mine=1"},
        ),
    )
    assert r["status"] == "succeeded", r
    first, second = api_server.requests[before:]
    assert first.headers["Authorization"] == f"Bearer {SECRET}"
    assert second.headers["Host"] == f"other.test:{api_server.port}"
    assert "Authorization" not in second.headers and "Cookie" not in second.headers
    assert r["output"]["auth_stripped"] is True
    assert r["output"]["redirects"] == [target]


def test_secret_bound_elsewhere_is_refused_up_front(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    before = len(api_server.requests)
    r = run(executor, api_action(api_server.url("/echo"), auth={"secret": "gh"}))
    assert r["status"] == "denied" and r["error"]["type"] == "policy_denied"
    assert "not bound to" in r["error"]["message"]
    r = run(executor, api_action(api_server.url("/echo"), auth={"secret": "unbound"}))
    assert r["error"]["type"] == "policy_denied"
    assert len(api_server.requests) == before


def test_unknown_secret_is_not_found_naming_only_it(executor: ApiExecutor, api_server: ApiServer):
    r = run(executor, api_action(api_server.url("/echo"), auth={"secret": "nope"}))
    assert r["error"]["type"] == "not_found"
    assert "'nope'" in r["error"]["message"]
    assert "gh" not in r["error"]["message"].replace("nope", "")
    r = run(executor, api_action(api_server.url("/echo"), auth={"secret": "../gh"}))
    assert r["error"]["type"] == "validation_error"


def test_secret_never_reaches_the_audit_store(
    executor: ApiExecutor, api_server: ApiServer, tmp_path: Path
) -> None:
    from audit.config import STREAM
    from audit.emitter import AuditMiddleware
    from audit.ingester import Ingester
    from tests.audit_fixtures import chdb_available, redis_for_test

    chdb_available()
    spellings = [SECRET, base64.b64encode(SECRET.encode()).decode().rstrip("=")]
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        ok = api_action(api_server.url("/echo", "api.test"), auth={"secret": "gh"})
        bad = api_action(api_server.url("/leaky-redirect", "api.test"), auth={"secret": "gh"})
        results = [run(executor, ok, [mw]), run(executor, bad, [mw])]
        assert [r["status"] for r in results] == ["succeeded", "denied"]
        assert api_server.seen("/echo")[-1].headers["Authorization"] == f"Bearer {SECRET}"
        for s in spellings:
            assert s not in json.dumps(results)
        assert mw.flush(10)
        stream = b"".join(f[b"e"] for _, f in rs.client().xrange(STREAM)).decode()
        assert stream and all(s not in stream for s in spellings)
        mw.close()
        ingester = Ingester(
            rs.url(), f"chdb://{tmp_path}/store", batch_age_s=0.1, serve_queries=False
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ingester.run_once()
                if ingester.lag() == {"stream_length": 0, "pending": 0} and not ingester._buf:
                    break
            db = ingester.client
            rows = db.query("SELECT count() FROM actionfleet.action_results").result_rows
            assert rows == [(2,)]
            for table in ("audit_events", "action_results"):
                text = json.dumps(
                    db.query(f"SELECT * FROM actionfleet.{table}").result_rows, default=str
                )
                for s in spellings:
                    assert s not in text, f"secret found in {table}"
        finally:
            ingester.close()


# ------------------------------------------------------------------ SSRF


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://internal.test/",
        "http://mixed.test/",
    ],
)
def test_ssrf_refused_before_connecting(executor: ApiExecutor, url: str) -> None:
    # Tenant acme has the default egress policy: public addresses only.
    r = run(executor, api_action(url, tenant="acme"))
    assert r["status"] == "denied", r
    assert r["error"]["type"] == "network_blocked"
    assert r["error"]["details"]["reason"] == "address"


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://167772161/",
        "http://012.0.0.1/",
        "http://internal.test/",
        "http://[::ffff:a9fe:a9fe]/",
        "gopher://api.test/",
    ],
)
def test_redirect_to_a_blocked_address_is_refused(
    executor: ApiExecutor, api_server: ApiServer, target: str
) -> None:
    before = len(api_server.requests)
    r = run(executor, api_action(api_server.url(f"/redirect?to={target}&code=307")))
    assert r["error"]["type"] == "network_blocked", r["error"]
    assert len(api_server.requests) == before + 1  # only the redirecting request was sent


# ------------------------------------------------------------------ retries


def test_flaky_server_succeeds_on_attempt_three(executor: ApiExecutor, api_server: ApiServer):
    r = run(executor, api_action(api_server.url("/flaky")))
    assert r["status"] == "succeeded", r
    assert r["output"]["attempts"] == 3 and r["output"]["body"] == {"ok": True}
    assert api_server.counters["/flaky"] == 3


def test_429_retry_after_is_honoured(executor: ApiExecutor, api_server: ApiServer) -> None:
    t = time.monotonic()
    r = run(executor, api_action(api_server.url("/ratelimited")))
    waited = time.monotonic() - t
    assert r["status"] == "succeeded" and r["output"]["attempts"] == 2
    assert waited >= 1.0  # the server said Retry-After: 1


def test_retry_after_beyond_the_timeout_returns_rate_limited(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    r = run(executor, api_action(api_server.url("/always429"), timeout_s=5))
    assert r["error"]["type"] == "rate_limited"
    assert r["error"]["details"]["retry_after_s"] == 3600
    assert r["error"]["details"]["attempts"] == 1
    assert api_server.counters["/always429"] == 1


def test_post_without_idempotency_key_not_retried_after_reset(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    before = api_server.counters.get("/reset", 0)
    raw = api_action(
        api_server.url("/reset"), method="POST", json={"pay": 10}, headers={"Idempotency-Key": ""}
    )
    r = run(executor, raw)
    assert api_server.counters["/reset"] - before == 1
    assert "Idempotency-Key" not in api_server.seen("/reset")[-1].headers
    assert r["error"]["type"] == "upstream_error" and r["error"]["retryable"] is False
    assert r["error"]["details"]["may_have_been_processed"] is True


def test_post_with_idempotency_key_is_retried_after_reset(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    before = api_server.counters.get("/reset", 0)
    r = run(executor, api_action(api_server.url("/reset"), method="POST", json={"pay": 10}))
    assert api_server.counters["/reset"] - before == 3  # the policy's max_attempts
    keys = {s.headers["Idempotency-Key"] for s in api_server.seen("/reset")[-3:]}
    assert len(keys) == 1  # the same key on every attempt
    assert r["error"]["type"] == "upstream_error" and r["error"]["details"]["attempts"] == 3


def test_policy_can_turn_the_idempotency_key_off(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    before = api_server.counters.get("/reset", 0)
    r = run(
        executor,
        api_action(api_server.url("/reset"), tenant="apinokey", method="POST", body="x"),
    )
    assert api_server.counters["/reset"] - before == 1
    assert r["error"]["details"]["may_have_been_processed"] is True


def test_connection_refused_is_retried_then_upstream_error(executor: ApiExecutor) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r = run(executor, api_action(f"http://127.0.0.1:{port}/", method="POST"))
    assert r["error"]["type"] == "upstream_error" and r["error"]["retryable"] is True
    assert r["error"]["details"]["attempts"] == 3


# ------------------------------------------------------------------ limits


def test_decompression_bomb_is_refused(executor: ApiExecutor, api_server: ApiServer) -> None:
    r = run(executor, api_action(api_server.url("/bomb")))
    assert r["error"]["type"] == "resource_exhausted", r
    assert "decompress" in r["error"]["message"]


def test_gzip_body_is_decoded(executor: ApiExecutor, api_server: ApiServer) -> None:
    r = run(executor, api_action(api_server.url("/gzip")))
    assert r["output"]["body"] == {"packed": True}
    assert api_server.seen("/gzip")[-1].headers["Accept-Encoding"] == "gzip, deflate"


def test_large_body_is_cut_and_flagged(executor: ApiExecutor, api_server: ApiServer) -> None:
    r = run(executor, api_action(api_server.url("/big")))
    out = r["output"]
    assert out["truncated"] is True and out["body_bytes"] == 1 << 20
    assert len(out["body"]) == 1 << 20


def test_timeout_above_policy_is_denied(executor: ApiExecutor, api_server: ApiServer) -> None:
    r = run(executor, api_action(api_server.url("/echo"), timeout_s=300))
    assert r["error"]["type"] == "policy_denied" and r["error"]["details"]["limit"] == 120


# ------------------------------------------------------------------ end to end


def test_fleet_worker_injects_a_secret_it_never_returns(
    api_server: ApiServer,
    redis_server: Any,
    make_client: Any,
    tmp_path: Path,
) -> None:
    from tests.conftest import start_worker

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "local-api").write_text(SECRET)
    (secrets / "local-api.meta.json").write_text(json.dumps({"hosts": ["127.0.0.1"]}))
    url = redis_server.url(13)
    redis_server.client(13).flushdb()
    worker = start_worker(
        url, tmp_path / "w", queues="actions.api", concurrency=2, secrets_dir=str(secrets)
    )
    try:
        client = make_client(url)
        results = [
            client.run(
                api_action(api_server.url("/echo"), auth={"secret": "local-api"}), timeout=60
            ),
            client.run(api_action(api_server.url("/flaky-e2e")), timeout=60),
            client.run(api_action("http://169.254.169.254/latest/meta-data/"), timeout=60),
        ]
        ok, missing, blocked = results
        assert ok.status == "succeeded" and ok.output is not None, ok
        assert ok.output["body"]["headers"]["Authorization"] == "Bearer [REDACTED]"
        assert api_server.seen("/echo")[-1].headers["Authorization"] == f"Bearer {SECRET}"
        assert missing.status == "succeeded" and missing.output["status"] == 404  # type: ignore[index]
        assert blocked.status == "denied" and blocked.error is not None
        assert blocked.error.type == "network_blocked"
        assert all(SECRET not in r.model_dump_json() for r in results)
    finally:
        worker.stop()
    assert SECRET not in worker.log.read_text()


def test_5xx_to_an_unsafe_post_is_neither_repeated_nor_retryable(
    executor: ApiExecutor, api_server: ApiServer
) -> None:
    unsafe = api_action(
        api_server.url("/down"), method="POST", body="x", headers={"Idempotency-Key": ""}
    )
    r = run(executor, unsafe)
    assert api_server.counters["/down"] == 1
    assert r["error"]["type"] == "upstream_error" and r["error"]["retryable"] is False
    assert r["error"]["details"]["status"] == 503 and r["output"]["status"] == 503
    r = run(executor, api_action(api_server.url("/down"), method="POST", body="x"))
    assert api_server.counters["/down"] == 1 + 3  # with the derived key: retried
    assert r["error"]["retryable"] is True
