"""The api primitive's secret injection against a real HTTP server on loopback: each
auth scheme, binding to hosts, stripping on a redirect, scrubbing from results, the audit
store and a real fleet worker's log. The server and helpers are in
``tests/api_fixtures.py``.

Every test runs under the tripwire: a socket connecting anywhere but loopback fails the
test, so an SSRF refusal is proven to happen before any packet leaves.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.api_fixtures import SECRET, ApiServer, api_action, run
from workers.executors.api import ApiExecutor

pytestmark = pytest.mark.usefixtures("tripwire")


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
    from tests.audit_fixtures import chdb_available, drained_ingester, redis_for_test

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
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
            db = ingester.client
            rows = db.query("SELECT count() FROM actionfleet.action_results").result_rows
            assert rows == [(2,)]
            for table in ("audit_events", "action_results"):
                text = json.dumps(
                    db.query(f"SELECT * FROM actionfleet.{table}").result_rows, default=str
                )
                for s in spellings:
                    assert s not in text, f"secret found in {table}"


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
