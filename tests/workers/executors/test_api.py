"""The api primitive's HTTP behaviour against a real HTTP server on loopback, through the
real pipeline: requests and headers, SSRF refusals, retries, limits. Secret injection is
in ``test_api_secrets.py``; the server and helpers are in ``tests/api_fixtures.py``.

Every test runs under the tripwire: a socket connecting anywhere but loopback fails the
test, so an SSRF refusal is proven to happen before any packet leaves.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.api_fixtures import ApiServer, api_action, run
from workers.executors.api import ApiExecutor, idempotency_header_value

pytestmark = pytest.mark.usefixtures("tripwire")


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
