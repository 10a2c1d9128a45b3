"""Browse egress: every request the browser makes is checked by the tenant's policy in the
worker's egress proxy, and refused before any packet is sent.

Every test here runs under the tripwire: the proxy runs in this process, so a connection
attempt to anything but loopback fails the test instead of leaving the machine. Pages only
name non-loopback destinations by host names (``metadata.test``, ``private.test``) that
only the proxy's resolver knows; Chromium itself never resolves a name, so even a browser
that skipped the proxy could not reach them.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import quote

import pytest

from producer.errors import NetworkBlocked
from tests.browse_fixtures import (
    LOCAL_EGRESS,
    RESOLVER,
    Site,
    browse_action,
    run,
    run_error,
    tenant_policy,
)
from workers.outbound.egress import IPAddress

pytestmark = pytest.mark.usefixtures("tripwire")


def _subres(site: Site, src: str, tag: str = "img") -> str:
    return site.url(f"/subres?tag={tag}&src={quote(src, safe='')}")


def _blocked(err: Any) -> list[dict[str, Any]]:
    assert isinstance(err, NetworkBlocked), err
    assert err.status == "denied" and err.type == "network_blocked"
    return list(err.details["blocked"])


def test_default_policy_refuses_the_local_site(browse_executor: Any, site: Site) -> None:
    default = tenant_policy()
    err = run_error(browse_executor, browse_action(site.url("/")), default)
    assert isinstance(err, NetworkBlocked) and err.details["reason"] == "port"
    any_port = tenant_policy(egress={"any_port": True})
    err = run_error(browse_executor, browse_action(site.url("/")), any_port)
    assert isinstance(err, NetworkBlocked)
    assert (err.details["reason"], err.details["address"]) == ("address", "127.0.0.1")
    assert err.details["url"] == site.url("/")


class RebindingResolver:
    """Answers a public address the first time and loopback afterwards: the upfront
    check sees a public host, the proxy must still refuse what it would connect to."""

    def __init__(self) -> None:
        self.calls = 0

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.calls += 1
        return [ipaddress.ip_address("93.184.216.34" if self.calls == 1 else "127.0.0.1")]


def test_dns_rebinding_is_refused_by_the_proxy(browse_executor: Any, site: Site) -> None:
    rebinding = RebindingResolver()
    browse_executor.resolver = rebinding
    try:
        url = f"http://rebind.test:{site.port}/"
        err = run_error(
            browse_executor, browse_action(url), tenant_policy(egress={"any_port": True})
        )
    finally:
        browse_executor.resolver = RESOLVER
    blocked = _blocked(err)
    assert rebinding.calls >= 2  # the upfront check, then the proxy
    assert blocked[0] == {
        "url": url,
        "host": "rebind.test",
        "reason": "address",
        "address": "127.0.0.1",
    }


def test_redirect_to_a_refused_address_is_refused(browse_executor: Any, site: Site) -> None:
    target = "http://metadata.test/latest/meta-data/"
    err = run_error(browse_executor, browse_action(site.url(f"/redirect?to={quote(target)}")))
    blocked = _blocked(err)
    assert err.details["url"] == target
    assert blocked[0] == {
        "url": target,
        "host": "metadata.test",
        "reason": "address",
        "address": "169.254.169.254",
    }
    # Whatever else the browser tried there (e.g. /favicon.ico) was refused the same way.
    assert {b["address"] for b in blocked} == {"169.254.169.254"}
    assert "link-local" in err.message


def test_subresource_to_a_refused_address_is_blocked(browse_executor: Any, site: Site) -> None:
    err = run_error(browse_executor, browse_action(_subres(site, "http://private.test/x.png")))
    assert _blocked(err) == [
        {
            "url": "http://private.test/x.png",
            "host": "private.test",
            "reason": "address",
            "address": "10.0.0.1",
        }
    ]
    # The page itself was allowed and loaded: what it showed is still reported.
    assert err.output["title"] == "Subres" and "page" in err.output["text"]


def test_https_and_websocket_tunnels_are_checked(browse_executor: Any, site: Site) -> None:
    err = run_error(browse_executor, browse_action(_subres(site, "https://metadata.test/x.png")))
    assert _blocked(err)[0] == {
        "url": "https://metadata.test:443",
        "host": "metadata.test",
        "reason": "address",
        "address": "169.254.169.254",
    }
    ws = _subres(site, "ws://private.test/socket", tag="ws")
    steps = [{"action": "wait_for", "text": "page"}]
    err = run_error(browse_executor, browse_action(ws, steps=steps))
    assert _blocked(err)[0]["address"] == "10.0.0.1"
    assert _blocked(err)[0]["url"] == "https://private.test:80"  # a CONNECT tunnel


def test_loopback_literals_go_through_the_proxy_too(browse_executor: Any, site: Site) -> None:
    only_one = tenant_policy(egress={"allow_cidrs": ["127.0.0.1/32"], "any_port": True})
    ok = run(browse_executor, browse_action(_subres(site, site.url("/pixel.png"))), only_one)
    assert ok["title"] == "Subres"
    other = site.url("/pixel.png", host="127.0.0.2")
    err = run_error(browse_executor, browse_action(_subres(site, other)), only_one)
    # Only the proxy can have seen this request: Chromium did not bypass it for loopback.
    assert _blocked(err) == [
        {"url": other, "host": "127.0.0.2", "reason": "address", "address": "127.0.0.2"}
    ]


@pytest.mark.parametrize("url", ["http://private.test/", "http://metadata.test/latest"])
def test_names_resolving_to_private_addresses_are_refused(browse_executor: Any, url: str) -> None:
    err = run_error(browse_executor, browse_action(url), tenant_policy(egress=LOCAL_EGRESS))
    assert isinstance(err, NetworkBlocked) and err.details["reason"] == "address"
    assert err.details["url"] == url


@pytest.mark.parametrize("url", ["file:///etc/passwd", "chrome://version/", "ftp://site.test/"])
def test_non_http_schemes_are_refused(browse_executor: Any, site: Site, url: str) -> None:
    err = run_error(browse_executor, browse_action(url))
    assert isinstance(err, NetworkBlocked) and err.details["reason"] == "scheme"
    assert err.details["field"] == "payload.url"
    steps = [{"action": "goto", "url": url}]
    err = run_error(browse_executor, browse_action(site.url("/"), steps=steps))
    assert isinstance(err, NetworkBlocked) and err.details["reason"] == "scheme"
    assert err.details["field"] == "payload.steps[0].url"
