"""The two kinds of refused request, and what each does to a browse action.

The egress proxy refuses a request before anything is sent; this module decides, once the
page is done, what the refusal means for the action:

* **hard** — the address rules (loopback, private, link-local/metadata, CGNAT, reserved,
  or a DNS answer pointing there), the port and scheme allowlists: the page reached for
  something no tenant setting lets it reach. The action ends ``denied`` /
  ``network_blocked``, every hard refusal in ``error.details.blocked``.
* **listed** — a request whose host the tenant's *domain lists* refuse (not on
  ``allow_domains``, on ``deny_domains``, or a public IP literal while domains are listed).
  For a sub-resource (image, script, font, fetch, websocket, iframe) it is dropped: the
  browser sees a failed request, the page goes on, and the action lists it in
  ``output.blocked`` (url, host, reason). For the navigation of the action's page itself
  (a redirect of the main document, a click or script that navigates it) it is hard.
  ``browse.subresource_refusal: deny`` makes every listed refusal hard.

Which request was a navigation is known from the browser (``Navigations`` watches the
page's main-frame navigation requests); the proxy only sees host and port, so a listed
refusal is hard when its host and port are those of a main-frame navigation. A script that
navigates the page in the very last moment, after the page was read, may have its request
event arrive after this decision and count as a sub-resource: the refused host was not
reached either way, and what the action read came from the allowed page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from playwright.async_api import Page, Request

from workers.browser.proxy import RequestRecord
from workers.outbound.egress import parse_host

__all__ = [
    "LISTED_REASONS",
    "Navigations",
    "SubresourceRefusal",
    "blocked_entry",
    "hard_entry",
    "split_refusals",
]

SubresourceRefusal = Literal["drop", "deny"]

# The guard's domain rule -> the reason an agent reads in output.blocked.
LISTED_REASONS: dict[str, str] = {
    "allow_domains": "domain_not_allowed",
    "deny_domains": "domain_denied",
    "ip_literal": "ip_not_allowed",
}
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(url: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
        host = parse_host(parts.hostname or "")
    except Exception:  # a URL the guard would refuse anyway: not a navigation target
        return None
    return str(host), port


@dataclass
class Navigations:
    """(host, port) of every main-frame navigation request of the action's page."""

    targets: set[tuple[str, int]] = field(default_factory=set)

    def watch(self, page: Page) -> None:
        def on_request(request: Request) -> None:
            try:
                main = request.frame == page.main_frame
            except Exception:  # a worker's request has no frame
                return
            if main and request.is_navigation_request():
                self.add(request.url)

        page.on("request", on_request)

    def add(self, url: str) -> None:
        target = _host_port(url)
        if target is not None:
            self.targets.add(target)


def _listed(rec: RequestRecord) -> bool:
    return rec.reason == "domain" and rec.rule in LISTED_REASONS


def split_refusals(
    records: list[RequestRecord], navigations: Navigations, mode: SubresourceRefusal
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """(hard, dropped): the refusals that end the action, and the sub-resources dropped."""
    hard: list[RequestRecord] = []
    dropped: list[RequestRecord] = []
    for rec in records:
        navigation = (rec.host, rec.port) in navigations.targets
        if mode == "drop" and _listed(rec) and not navigation:
            dropped.append(rec)
        else:
            hard.append(rec)
    return hard, dropped


def blocked_entry(rec: RequestRecord) -> dict[str, Any]:
    """One ``output.blocked`` entry: a dropped sub-resource."""
    return {"url": rec.url, "host": rec.host, "reason": LISTED_REASONS.get(rec.rule, rec.reason)}


def hard_entry(rec: RequestRecord) -> dict[str, Any]:
    """One ``error.details.blocked`` entry: a refusal that ended the action."""
    return {"url": rec.url, "host": rec.host, "reason": rec.reason, "address": rec.address}
