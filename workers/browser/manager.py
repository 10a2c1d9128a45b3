"""One long-lived Chromium per worker process, driven from one dedicated thread.

Playwright objects belong to the thread (event loop) that created them, while Celery may
call the executor from any thread. So the browser lives on a private asyncio loop in a
daemon thread; ``BrowserManager.run`` hands a coroutine to that loop and waits for it.
Several actions can therefore share the browser concurrently (thread pools), each in its
own context, and a prefork pool process builds its own manager after the fork (executors
are created lazily, per process).

Every action gets a FRESH browser context (Chromium's off-the-record profile: no cookies,
storage, cache, service workers or downloads shared with any other context), closed at
the end whatever happened. If the browser or Playwright's driver dies, the next action
starts a new one; if closing a context hangs (a wedged renderer), the browser is
restarted so the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from playwright.async_api import Browser, BrowserContext, Playwright, async_playwright
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeout

from producer.errors import ActionTimeout, InternalError

__all__ = ["BASE_ARGS", "BrowserManager", "LaunchOptions", "launch_args"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# From ENVIRONMENT.md: what makes Debian's Chromium quiet and usable headless here.
BASE_ARGS: tuple[str, ...] = (
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    # Chromium itself never resolves a name: everything goes through the egress proxy,
    # which resolves once and pins. This closes DNS as a side channel if a request ever
    # skipped the proxy.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-bypass-list=<-loopback>",
)
CLOSE_TIMEOUT_S = 5.0
# Beyond the action's own timeout, how long the caller waits for the loop to answer.
GRACE_S = 10.0


def launch_args() -> list[str]:
    args = list(BASE_ARGS)
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to start as root otherwise
    return args


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    executable: Path
    # Where requests of contexts WITHOUT their own proxy go: a proxy that refuses all.
    fallback_proxy: str
    launch_timeout_s: float = 30.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)


class BrowserManager:
    def __init__(self, options: LaunchOptions) -> None:
        self.options = options
        self.launches = 0  # how many browsers this manager started (tests, metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="browser-loop", daemon=True
        )
        self._thread.start()
        self._pw: Playwright | None = None
        self._browser: Browser | None = None
        self._launch_lock: asyncio.Lock | None = None
        self._closed = False
        # The driver inherits our environment; this variable would let Chromium bypass
        # the proxy for loopback, so it is never passed on.
        os.environ.pop("PLAYWRIGHT_DISABLE_FORCED_CHROMIUM_PROXIED_LOOPBACK", None)

    # -- public, any thread ------------------------------------------------------------

    def run(
        self,
        body: Callable[[BrowserContext], Awaitable[T]],
        *,
        context_options: dict[str, Any],
        timeout_s: float,
        on_timeout: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> T:
        """Run ``body`` in a fresh context; the context is closed afterwards. Raises
        ``ActionTimeout`` when ``timeout_s`` passes (the context is closed all the same)."""
        if self._closed:
            raise InternalError("the browser manager is closed; retry on another worker")
        fut = asyncio.run_coroutine_threadsafe(
            self._in_context(body, context_options, timeout_s, on_timeout), self._loop
        )
        try:
            return fut.result(timeout_s + CLOSE_TIMEOUT_S + GRACE_S)
        except concurrent.futures.TimeoutError:
            # The loop itself did not answer in time: cancel and replace the browser.
            fut.cancel()
            asyncio.run_coroutine_threadsafe(self._restart(), self._loop)
            raise ActionTimeout(
                f"the page did not finish within {timeout_s:g}s and the browser had to be "
                "restarted; retry, or ask for less (fewer steps, a longer timeout_s)",
                timeout_s=timeout_s,
            ) from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # -- on the loop -------------------------------------------------------------------

    async def _in_context(
        self,
        body: Callable[[BrowserContext], Awaitable[T]],
        context_options: dict[str, Any],
        timeout_s: float,
        on_timeout: Callable[[], dict[str, Any] | None],
    ) -> T:
        browser = await self._ensure_browser()
        try:
            context = await browser.new_context(**context_options)
        except PlaywrightError:
            # The browser died between actions (its disconnect may not be processed yet):
            # this action gets a new one.
            browser = await self._ensure_browser(replace=browser)
            context = await browser.new_context(**context_options)
        try:
            return await asyncio.wait_for(body(context), timeout_s)
        except (TimeoutError, PlaywrightTimeout):
            raise ActionTimeout(
                f"the action did not finish within its {timeout_s:g}s timeout (a page that "
                "never finishes loading, a selector that never appears, or too many steps); "
                "ask for a longer timeout_s or wait for a specific selector instead",
                output=on_timeout(),
                timeout_s=timeout_s,
            ) from None
        finally:
            try:
                await asyncio.wait_for(context.close(), CLOSE_TIMEOUT_S)
            except Exception:
                log.warning("closing a browser context failed; restarting the browser")
                await self._restart()

    async def _ensure_browser(self, replace: Browser | None = None) -> Browser:
        if self._launch_lock is None:
            self._launch_lock = asyncio.Lock()
        async with self._launch_lock:
            current = self._browser
            if current is not None and current is not replace and current.is_connected():
                return current
            await self._drop_browser()
            if self._pw is None:
                self._pw = await async_playwright().start()
            try:
                self._browser = await self._launch(self._pw)
            except Exception as exc:
                # The driver may be the broken part: start it afresh next time.
                await self._stop_driver()
                raise InternalError(
                    f"the browser failed to start ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]}); retry later",
                    executable=str(self.options.executable),
                ) from None
            self.launches += 1
            return self._browser

    async def _launch(self, pw: Playwright) -> Browser:
        o = self.options
        return await pw.chromium.launch(
            executable_path=str(o.executable),
            headless=True,
            args=[*launch_args(), *o.extra_args],
            proxy={"server": o.fallback_proxy},
            chromium_sandbox=False,
            timeout=o.launch_timeout_s * 1000,
            handle_sigint=False,
            handle_sigterm=False,
            handle_sighup=False,
        )

    async def _drop_browser(self) -> None:
        browser, self._browser = self._browser, None
        if browser is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(browser.close(), CLOSE_TIMEOUT_S)

    async def _stop_driver(self) -> None:
        pw, self._pw = self._pw, None
        if pw is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pw.stop(), CLOSE_TIMEOUT_S)

    async def _restart(self) -> None:
        """Drop browser and driver; stopping the driver kills a browser that hangs."""
        self._browser = None
        await self._stop_driver()

    async def _shutdown(self) -> None:
        await self._drop_browser()
        await self._stop_driver()
