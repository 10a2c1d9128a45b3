"""The two kinds of refusal: a sub-resource refused only by the tenant's domain lists is
dropped (the page goes on, ``output.blocked`` lists it); anything the address rules refuse,
and the navigation of the page itself to a refused host, ends the action ``denied``.

Under the tripwire (see test_browse_egress.py): the proxy runs in this process, and pages
name non-loopback destinations only by host names the proxy's resolver knows. The refused
third party is a second real loopback server that counts every connection it accepts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from audit.emitter import AuditMiddleware
from audit.store import ClientReader
from producer.errors import NetworkBlocked
from tests.audit_fixtures import drained_ingester, redis_for_test
from tests.browse_fixtures import (
    Site,
    browse_action,
    run,
    run_error,
    serve_site,
    tenant_policy,
)
from workers.middleware import ActionContext
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine

pytestmark = pytest.mark.usefixtures("tripwire")

ALLOW_SITE = {"allow_domains": ["site.test"], "allow_cidrs": ["127.0.0.0/8"], "any_port": True}
WAIT_FOR_FAILURES = [
    {"action": "wait_for", "text": "fetch-failed", "timeout_s": 10},
    {"action": "wait_for", "text": "ws-failed", "timeout_s": 10},
]


@pytest.fixture(scope="module")
def cdn() -> Iterator[Site]:
    """The third party: reachable on loopback, refused by the tenant's domain lists."""
    with serve_site() as s:
        yield s


def _ctx() -> ActionContext:
    return ActionContext(primitive="browse", queue="actions.browse", worker="t", attempt=1, raw={})


def _mixed(site: Site, cdn: Site) -> str:
    return f"http://site.test:{site.port}/mixed?other=cdn.test:{cdn.port}"


def _refused_urls(cdn: Site) -> set[str]:
    other = f"cdn.test:{cdn.port}"
    return {
        f"http://{other}/tracker.png",  # img (plain http: the proxy sees the URL)
        f"https://{other}",  # the https script: a CONNECT tunnel
        f"http://{other}/api",  # fetch()
        # the websocket is a CONNECT tunnel to the same authority as the script
    }


def test_listed_subresources_are_dropped_and_the_page_succeeds(
    browse_executor: Any, site: Site, cdn: Site
) -> None:
    before = cdn.connections
    ctx = _ctx()
    action = browse_action(_mixed(site, cdn), steps=WAIT_FOR_FAILURES, extract=["text"])
    out = run(browse_executor, action, tenant_policy(egress=ALLOW_SITE), ctx=ctx)
    assert (out["status"], out["title"]) == (200, "Mixed")
    assert "The allowed text." in out["text"]
    assert "fetch-failed" in out["text"] and "ws-failed" in out["text"]
    blocked = out["blocked"]
    assert {b["url"] for b in blocked} == _refused_urls(cdn)
    assert {(b["host"], b["reason"]) for b in blocked} == {("cdn.test", "domain_not_allowed")}
    assert cdn.connections == before  # nothing reached the refused server
    # One entry per URL; the audit row counts every refused request: the image, the
    # fetch, and two tunnels to the same authority (the https script, the websocket).
    assert len(blocked) == 3
    assert ctx.extra["usage"]["blocked_requests"] == 4


def test_subresource_refusal_deny_keeps_the_strict_behaviour(
    browse_executor: Any, site: Site, cdn: Site
) -> None:
    before = cdn.connections
    strict = tenant_policy(egress=ALLOW_SITE, browse={"subresource_refusal": "deny"})
    action = browse_action(_mixed(site, cdn), steps=WAIT_FOR_FAILURES, extract=["text"])
    err = run_error(browse_executor, action, strict)
    assert isinstance(err, NetworkBlocked) and err.status == "denied"
    refused = {b["url"] for b in err.details["blocked"]}
    assert _refused_urls(cdn) <= refused
    assert {b["reason"] for b in err.details["blocked"]} == {"domain"}
    assert "The allowed text." in err.output["text"] and err.output["blocked"] == []
    assert cdn.connections == before


def test_deny_list_subresource_is_dropped(browse_executor: Any, site: Site, cdn: Site) -> None:
    before = cdn.connections
    deny = {"deny_domains": ["cdn.test"], "allow_cidrs": ["127.0.0.0/8"], "any_port": True}
    action = browse_action(_mixed(site, cdn), steps=WAIT_FOR_FAILURES, extract=["text"])
    out = run(browse_executor, action, tenant_policy(egress=deny))
    assert {b["url"] for b in out["blocked"]} == _refused_urls(cdn)
    assert {b["reason"] for b in out["blocked"]} == {"domain_denied"}
    assert cdn.connections == before


def _subres(site: Site, src: str) -> str:
    return f"http://site.test:{site.port}/subres?src={quote(src, safe='')}"


@pytest.mark.parametrize(
    ("src", "address"),
    [
        # allow-listed by name, but the resolver points it at a private address
        ("http://intranet.site.test/x.png", "10.0.0.2"),
        ("https://intranet.site.test/x.png", "10.0.0.2"),
        # an IP literal: judged by the address rules before the domain lists
        ("http://10.0.0.1/x.png", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ],
)
def test_address_refusals_still_deny_under_an_allowlist(
    browse_executor: Any, site: Site, src: str, address: str
) -> None:
    err = run_error(
        browse_executor, browse_action(_subres(site, src)), tenant_policy(egress=ALLOW_SITE)
    )
    assert isinstance(err, NetworkBlocked) and err.status == "denied"
    (first,) = err.details["blocked"]
    assert (first["reason"], first["address"]) == ("address", address)
    assert err.output["title"] == "Subres" and err.output["blocked"] == []


def test_navigations_to_a_listed_host_still_deny(
    browse_executor: Any, site: Site, cdn: Site
) -> None:
    before = cdn.connections
    policy = tenant_policy(egress=ALLOW_SITE)
    away = f"http://cdn.test:{cdn.port}/about"
    # the url itself and a goto step: refused before the browser is involved
    err = run_error(browse_executor, browse_action(away), policy)
    assert isinstance(err, NetworkBlocked) and err.details["reason"] == "domain"
    assert err.details["field"] == "payload.url"
    steps = [{"action": "goto", "url": away}]
    err = run_error(
        browse_executor, browse_action(f"http://site.test:{site.port}/", steps=steps), policy
    )
    assert isinstance(err, NetworkBlocked) and err.details["field"] == "payload.steps[0].url"
    # a redirect of the main document
    redirect = f"http://site.test:{site.port}/redirect?to={quote(away, safe='')}"
    err = run_error(browse_executor, browse_action(redirect), policy)
    assert isinstance(err, NetworkBlocked)
    assert err.details["blocked"][0]["url"] == away and err.details["reason"] == "domain"
    # a link the page follows (a click navigates the page itself)
    leave = f"http://site.test:{site.port}/leave?to={quote(away, safe='')}"
    err = run_error(
        browse_executor,
        browse_action(leave, steps=[{"action": "click", "selector": "#leave"}]),
        policy,
    )
    assert isinstance(err, NetworkBlocked)
    assert away in {b["url"] for b in err.details["blocked"]}
    assert cdn.connections == before


class _OneExecutor:
    """The executor registry of a browse worker: this one executor."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    def supports(self, primitive: str) -> bool:
        return primitive == "browse"

    def get(self, primitive: str) -> Any:
        return self.executor

    def close(self) -> None:
        pass


@pytest.mark.usefixtures("need_chdb")
def test_the_audit_row_counts_the_refusals(
    browse_executor: Any, site: Site, cdn: Site, tmp_path: Path
) -> None:
    """Pipeline -> real browse executor -> audit emitter -> Redis stream -> ingester ->
    chDB: the finished rows of both tables carry the number of refused requests."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps({"version": 1, "tenants": {"shop": {"egress": ALLOW_SITE}}}))
    raw = {
        "primitive": "browse",
        "tenant_id": "shop",
        "agent_id": "researcher",
        "payload": {"url": _mixed(site, cdn), "steps": WAIT_FOR_FAILURES},
    }
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        pipeline = Pipeline(PolicyEngine(policy), _OneExecutor(browse_executor), [mw])  # type: ignore[arg-type]
        ctx = ActionContext(
            primitive="browse", queue="actions.browse", worker="w", attempt=1, raw=raw
        )
        result = pipeline.run(ctx)
        assert result["status"] == "succeeded", result
        assert len(result["output"]["blocked"]) == 3
        assert mw.flush(10)
        mw.close()
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
            db = ClientReader(ingester.client, own=False)
            action_id = {"a": result["action_id"]}
            events = db.query(
                "SELECT stage, blocked_requests FROM audit_events "
                "WHERE action_id = {a:String} ORDER BY event_time",
                action_id,
            ).rows
            assert events == [["received", 0], ["policy", 0], ["started", 0], ["finished", 4]]
            finished = db.query(
                "SELECT status, blocked_requests FROM action_results WHERE action_id = {a:String}",
                action_id,
            ).rows
            assert finished == [["succeeded", 4]]
