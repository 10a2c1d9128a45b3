"""The ``browse`` primitive: drive a real Chromium through an egress-checked proxy.

One browser per worker process (``workers.browser.manager``), one FRESH context per
action, closed at the end. Every request of that context goes through the action's own
egress proxy (``workers.browser.proxy``), which applies the tenant's egress policy and
connects only to pinned addresses.

Outcomes, in the order they are decided:

1. A request refused by the address rules, the port or scheme allowlists, or a navigation
   of the page refused by the domain lists -> ``denied`` / ``network_blocked``, every
   such URL in ``error.details.blocked``; what the page produced is still in ``output``.
   A sub-resource refused only by the domain lists is dropped and listed in
   ``output.blocked`` (``workers.browser.refusals``; ``browse.subresource_refusal``).
2. The page pulled more than ``browse.max_page_bytes`` -> ``resource_exhausted``.
3. The action's ``timeout_s`` passed -> ``timed_out`` (the context is closed; the worker
   goes on serving).
4. Navigation failed (DNS, refused, TLS) or the main document answered >= 400 ->
   ``upstream_error`` (4xx not retryable; 5xx and 429 retryable), page output included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from playwright.async_api import BrowserContext, Page
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout

from producer.errors import (
    ActionError,
    NetworkBlocked,
    ResourceExhausted,
    UpstreamError,
)
from producer.models import Action, BrowseAction, BrowsePayload
from workers.browser.artifacts import save_artifact
from workers.browser.extract import empty_data, extract_all, split_extract
from workers.browser.manager import BrowserManager, LaunchOptions
from workers.browser.pdf import is_pdf, read_pdf
from workers.browser.proxy import ProxySession
from workers.browser.refusals import Navigations, blocked_entry, hard_entry, split_refusals
from workers.browser.steps import PageRun, check_steps, page_crashed
from workers.browser.storage import load_storage_state
from workers.middleware import ActionContext
from workers.outbound.egress import EgressGuard, EgressPolicy, Resolver
from workers.outbound.secrets import ChainSecretStore
from workers.policy import BrowseLimits, Grant
from workers.workspace.tenant import Workspaces

__all__ = ["BrowseExecutor"]

T = TypeVar("T")
DEFAULT_VIEWPORT = {"width": 1280, "height": 800}
_RETRYABLE_STATUS = {408, 425, 429}


class BrowseExecutor:
    primitive: ClassVar[str] = "browse"

    def __init__(
        self,
        *,
        executable: Path,
        workspaces: Workspaces,
        secrets: ChainSecretStore,
        resolver: Resolver | None = None,
    ) -> None:
        self.resolver = resolver
        self.workspaces = workspaces
        self.secrets = secrets
        # Contexts without their own proxy (there should be none) hit a proxy that
        # refuses everything: its guard allows no scheme at all.
        self._fallback = ProxySession(
            EgressGuard(EgressPolicy(schemes=[]), resolver), max_bytes=0
        ).start()
        self.manager = BrowserManager(
            LaunchOptions(executable=executable, fallback_proxy=self._fallback.server)
        )

    # -- the action --------------------------------------------------------------------

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, BrowseAction)
        p = action.payload
        limits: BrowseLimits = grant.tenant.browse
        timeout_s = p.timeout_s or limits.default_timeout_s
        check_steps(p.steps)
        guard = EgressGuard(grant.tenant.egress, self.resolver)
        # Fail fast with a clean error on the agent's own URLs (scheme, domain, address);
        # the proxy checks every request again, this only spares a browser round trip.
        _check_agent_url(guard, p.url, "payload.url")
        for i, step in enumerate(p.steps):
            if step.action == "goto" and step.url:
                _check_agent_url(guard, step.url, f"payload.steps[{i}].url")
        context_options: dict[str, Any] = {
            "viewport": dict(p.viewport or DEFAULT_VIEWPORT),
            "accept_downloads": False,
            "service_workers": "block",
            "ignore_https_errors": False,
        }
        if p.user_agent:
            context_options["user_agent"] = p.user_agent
        if p.session:
            redact: list[str] = ctx.extra.setdefault("secrets", [])
            context_options["storage_state"] = load_storage_state(
                self.secrets, p.session, p.url, redact
            )
        partial: dict[str, Any] = {"url": p.url}
        navigations = Navigations()
        navigations.add(p.url)
        with ProxySession(guard, max_bytes=limits.max_page_bytes) as proxy:
            context_options["proxy"] = {"server": proxy.server}
            try:
                output, png = self.manager.run(
                    lambda context: self._until_over_budget(
                        proxy,
                        self._browse(context, p, limits, timeout_s, partial, navigations, proxy),
                    ),
                    context_options=context_options,
                    timeout_s=timeout_s,
                    on_timeout=lambda: dict(partial),
                )
            except ActionError as exc:
                if exc.output is None:
                    exc.output = dict(partial)
                _refusals_first(proxy, limits, navigations, exc.output, ctx)
                raise
            output["bytes_received"] = proxy.bytes_in
            _refusals_first(proxy, limits, navigations, output, ctx)
        if png is not None:
            output["screenshot"] = save_artifact(
                self.workspaces,
                grant.tenant.files,
                action.tenant_id,
                action.action_id,
                "screenshot.png",
                png,
                "image/png",
            )
        status = output.get("status")
        if isinstance(status, int) and status >= 400:
            raise UpstreamError(
                f"{output['url']} answered HTTP {status}; the page's content is in the "
                "output. Check the URL"
                + (", or retry later" if status >= 500 or status in _RETRYABLE_STATUS else ""),
                output=output,
                retryable=status >= 500 or status in _RETRYABLE_STATUS,
                status=status,
                url=output["url"],
            )
        return output

    @staticmethod
    async def _until_over_budget(proxy: ProxySession, work: Awaitable[T]) -> T:
        """Run ``work`` but stop it the moment the proxy reports the page budget spent
        (``_refusals_first`` then reports resource_exhausted)."""
        loop = asyncio.get_running_loop()
        spent = asyncio.Event()
        proxy.on_over_budget = lambda: loop.call_soon_threadsafe(spent.set)
        if proxy.over_budget:
            spent.set()
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(spent.wait())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ResourceExhausted("the page budget was spent")  # replaced by the caller
        return task.result()

    async def _browse(
        self,
        context: BrowserContext,
        p: BrowsePayload,
        limits: BrowseLimits,
        timeout_s: float,
        partial: dict[str, Any],
        navigations: Navigations,
        proxy: ProxySession,
    ) -> tuple[dict[str, Any], bytes | None]:
        page = await context.new_page()
        navigations.watch(page)
        deadline = asyncio.get_running_loop().time() + timeout_s
        run = PageRun(page, deadline)
        try:
            await run.goto(p.url)
        except PlaywrightTimeout:
            raise  # the manager turns the whole action's timeout into timed_out
        except PlaywrightError as exc:
            if run.crashed:
                raise page_crashed() from None
            raise UpstreamError(
                f"{p.url} could not be loaded: {str(exc).splitlines()[0][:300]}; check the "
                "URL, or retry later",
                output=dict(partial),
                url=p.url,
            ) from None
        partial.update(url=page.url, status=run.status)
        await run.run_steps(p.steps)
        partial.update(url=page.url, status=run.status)
        try:
            return await self._read(page, run, p, limits, proxy)
        except PlaywrightTimeout:
            raise
        except PlaywrightError as exc:
            if run.crashed or "crash" in str(exc).lower():
                raise page_crashed() from None
            raise

    async def _read(
        self, page: Page, run: PageRun, p: BrowsePayload, limits: BrowseLimits, proxy: ProxySession
    ) -> tuple[dict[str, Any], bytes | None]:
        output: dict[str, Any] = {
            "url": page.url,
            "status": run.status,
            "title": await page.title(),
        }
        if is_pdf(run.content_type) and (run.status or 0) < 400:
            names, selectors = split_extract(list(p.extract))
            left = run.deadline - asyncio.get_running_loop().time()
            pdf, truncated = await read_pdf(page, page.url, names, limits, proxy.server, left)
            output |= pdf
            if selectors or "tables" in names:
                output["data"] = empty_data(names, selectors)
            output["truncated"] = truncated
        else:
            output |= await extract_all(page, list(p.extract), limits.max_extract_chars)
        png = None
        if "screenshot" in p.extract:
            png = await page.screenshot(type="png", full_page=False, animations="disabled")
            if len(png) > limits.max_screenshot_bytes:
                raise ResourceExhausted(
                    f"the screenshot is {len(png)} bytes, above this tenant's limit of "
                    f"{limits.max_screenshot_bytes}; ask for a smaller viewport",
                    output=output,
                    size=len(png),
                    limit=limits.max_screenshot_bytes,
                )
        output["steps_done"] = len(p.steps)
        output["page_errors"] = run.page_errors
        return output, png

    def close(self) -> None:
        self.manager.close()
        self._fallback.close()


def _check_agent_url(guard: EgressGuard, url: str, field: str) -> None:
    # The scheme first: file:, chrome:, javascript: and friends never reach the proxy (the
    # browser would open them itself), so they are refused here, by name.
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https") or scheme not in guard.policy.schemes:
        allowed = [s for s in guard.policy.schemes if s in ("http", "https")]
        raise NetworkBlocked(
            f"{field}: scheme {scheme or '(none)'!r} cannot be browsed; use one of: "
            f"{', '.join(allowed) or 'none (this tenant may not browse)'}",
            url=url,
            reason="scheme",
            field=field,
        )
    try:
        guard.check_url(url)
    except NetworkBlocked as exc:
        exc.details.setdefault("field", field)
        raise


def _refusals_first(
    proxy: ProxySession,
    limits: BrowseLimits,
    navigations: Navigations,
    output: dict[str, Any],
    ctx: ActionContext,
) -> None:
    """Dropped sub-resources go into ``output.blocked``; a hard refusal or a blown page
    budget outranks whatever else happened: the page may have failed *because* of it,
    and the agent must learn the real cause."""
    hard, dropped = split_refusals(proxy.blocked, navigations, limits.subresource_refusal)
    # One entry per URL: a page that asks a refused host ten times is one line to read.
    entries: dict[str, dict[str, Any]] = {}
    for b in dropped:
        entries.setdefault(b.url, blocked_entry(b))
    output["blocked"] = list(entries.values())
    if proxy.refused > len(proxy.blocked) and "blocked" not in output.get("truncated", []):
        output.setdefault("truncated", []).append("blocked")  # more than max_records
    # The audit row counts every refused request (audit.events reads ctx.extra["usage"]).
    ctx.extra.setdefault("usage", {})["blocked_requests"] = proxy.refused
    if hard:
        first = hard[0]
        raise NetworkBlocked(
            f"the page requested {first.url}, which the tenant's egress policy refuses "
            f"({first.message}); "
            + (f"{len(hard) - 1} more request(s) were refused too; " if len(hard) > 1 else "")
            + "browse only allowed destinations, or ask for the policy to allow it",
            output=output,
            url=first.url,
            reason=first.reason,
            blocked=[hard_entry(b) for b in hard],
        )
    if proxy.over_budget:
        raise ResourceExhausted(
            f"the page downloaded more than this tenant's limit of {limits.max_page_bytes} "
            "bytes and was cut off; visit a lighter page",
            output=output,
            limit=limits.max_page_bytes,
        )
