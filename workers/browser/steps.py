"""Driving one page: the first navigation, then the agent's ordered steps.

``check_steps`` validates every step before a browser is touched (field-level errors);
``PageRun`` performs them and remembers what the action reports even if it is cut short
(current URL, the main frame's last HTTP status, page errors).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, Response
from playwright.async_api import TimeoutError as PlaywrightTimeout

from producer.errors import ActionError, ActionTimeout, UpstreamError, ValidationError_
from producer.models import BrowseStep

__all__ = ["PageRun", "check_steps", "describe"]

MAX_PAGE_ERRORS = 20

# Which step fields each action needs.
_NEEDS: dict[str, tuple[str, ...]] = {
    "goto": ("url",),
    "click": ("selector",),
    "fill": ("selector", "value"),
    "press": ("value",),
    "select": ("selector", "value"),
    "wait_for": (),  # selector or text, checked below
    "scroll": (),
    "hover": ("selector",),
    "check": ("selector",),
}
_EXAMPLE: dict[str, str] = {
    "goto": '{"action": "goto", "url": "https://example.com/next"}',
    "click": '{"action": "click", "selector": "button[type=submit]"}',
    "fill": '{"action": "fill", "selector": "#q", "value": "search terms"}',
    "press": '{"action": "press", "selector": "#q", "value": "Enter"}',
    "select": '{"action": "select", "selector": "#size", "value": "large"}',
    "wait_for": '{"action": "wait_for", "selector": "#results"} or {"text": "Done"}',
    "hover": '{"action": "hover", "selector": "nav .menu"}',
    "check": '{"action": "check", "selector": "#agree"}',
}
_UNCHECK = {"false", "off", "0", "no", "uncheck"}


def describe(step: BrowseStep) -> str:
    what = step.selector or step.url or step.text or step.value or ""
    return f"{step.action} {what!r}" if what else step.action


def check_steps(steps: list[BrowseStep]) -> None:
    for i, step in enumerate(steps):
        where = f"payload.steps[{i}]"
        for name in _NEEDS[step.action]:
            if getattr(step, name) in (None, ""):
                raise ValidationError_(
                    f"{where}: step {step.action!r} needs {name!r}; e.g. {_EXAMPLE[step.action]}",
                    field=f"{where}.{name}",
                    reason=f"{step.action} without {name}",
                    fix=f"add {name}",
                )
        if step.action == "wait_for" and not (step.selector or step.text):
            raise ValidationError_(
                f"{where}: step 'wait_for' needs 'selector' or 'text'; e.g. {_EXAMPLE['wait_for']}",
                field=f"{where}.selector",
                reason="wait_for without selector or text",
                fix="add selector or text",
            )
        if step.action == "scroll" and step.value not in (None, "", "bottom", "top"):
            try:
                int(step.value)  # type: ignore[arg-type]
            except ValueError:
                raise ValidationError_(
                    f"{where}: scroll value {step.value!r} is not a pixel count; use an "
                    "integer (e.g. '800'), 'top' or 'bottom'",
                    field=f"{where}.value",
                    reason="not a pixel count",
                    fix="use an integer, 'top' or 'bottom'",
                ) from None


@dataclass
class PageRun:
    page: Page
    deadline: float  # loop.time() by which everything must be done
    status: int | None = None
    content_type: str | None = None  # of the main frame's last navigation response
    step: int | None = None  # index of the running step (None: first navigation)
    page_errors: list[str] = field(default_factory=list)
    crashed: bool = False

    def __post_init__(self) -> None:
        self.page.on("response", self._on_response)
        self.page.on("pageerror", self._on_page_error)
        self.page.on("crash", self._on_crash)

    # -- events ------------------------------------------------------------------------

    def _on_response(self, response: Response) -> None:
        if response.frame == self.page.main_frame and response.request.is_navigation_request():
            self.status = response.status
            self.content_type = response.headers.get("content-type")

    def _on_page_error(self, error: Any) -> None:
        if len(self.page_errors) < MAX_PAGE_ERRORS:
            self.page_errors.append(str(error)[:500])

    def _on_crash(self, _: Page) -> None:
        self.crashed = True

    # -- running -----------------------------------------------------------------------

    def _ms(self, step_timeout_s: float | None = None) -> float:
        left = max(0.05, self.deadline - asyncio.get_running_loop().time())
        if step_timeout_s is not None:
            left = min(left, step_timeout_s)
        return left * 1000

    async def goto(self, url: str, step_timeout_s: float | None = None) -> None:
        response = await self.page.goto(url, wait_until="load", timeout=self._ms(step_timeout_s))
        if response is not None:
            self.status = response.status
            self.content_type = response.headers.get("content-type")

    async def run_steps(self, steps: list[BrowseStep]) -> None:
        for i, step in enumerate(steps):
            self.step = i
            try:
                await self._one(step)
            except ActionError:
                raise
            except PlaywrightTimeout as exc:
                raise ActionTimeout(
                    f"step {i} ({describe(step)}) did not complete in time: "
                    f"{_first_line(exc)}; check the selector, wait for something that does "
                    "appear, or give the step a longer timeout_s",
                    field=f"payload.steps[{i}]",
                    step=i,
                ) from None
            except PlaywrightError as exc:
                raise self.step_error(i, step, exc) from None
        self.step = None

    def step_error(self, i: int, step: BrowseStep, exc: PlaywrightError) -> ActionError:
        msg = _first_line(exc)
        if self.crashed or "crash" in msg.lower():
            return page_crashed()
        if "net::" in msg:
            return UpstreamError(
                f"step {i} ({describe(step)}) failed to load: {msg}",
                field=f"payload.steps[{i}]",
                step=i,
            )
        return ValidationError_(
            f"step {i} ({describe(step)}) could not be performed: {msg}; fix the step",
            field=f"payload.steps[{i}]",
            reason=msg,
            fix="check the selector and value against the page",
        )

    async def _one(self, step: BrowseStep) -> None:
        page, t = self.page, self._ms(step.timeout_s)
        a = step.action
        if a == "goto":
            await self.goto(step.url or "", step.timeout_s)
            return
        if a == "click":
            await page.click(step.selector or "", timeout=t)
        elif a == "fill":
            await page.fill(step.selector or "", step.value or "", timeout=t)
        elif a == "press":
            if step.selector:
                await page.press(step.selector, step.value or "", timeout=t)
            else:
                await page.keyboard.press(step.value or "")
        elif a == "select":
            await page.select_option(step.selector or "", step.value, timeout=t)
        elif a == "wait_for":
            if step.selector:
                await page.wait_for_selector(step.selector, state="visible", timeout=t)
            else:
                await page.get_by_text(step.text or "").first.wait_for(timeout=t)
            return
        elif a == "scroll":
            await self._scroll(step, t)
            return
        elif a == "hover":
            await page.hover(step.selector or "", timeout=t)
        elif a == "check":
            if (step.value or "").lower() in _UNCHECK:
                await page.uncheck(step.selector or "", timeout=t)
            else:
                await page.check(step.selector or "", timeout=t)
        # A click or key press may have started a navigation: let it finish loading.
        await page.wait_for_load_state("load", timeout=self._ms(step.timeout_s))

    async def _scroll(self, step: BrowseStep, t: float) -> None:
        if step.selector:
            await self.page.locator(step.selector).first.scroll_into_view_if_needed(timeout=t)
        elif step.value == "top":
            await self.page.evaluate("() => window.scrollTo(0, 0)")
        elif step.value == "bottom":
            await self.page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        else:
            dy = int(step.value) if step.value else None
            await self.page.evaluate("(dy) => window.scrollBy(0, dy ?? window.innerHeight)", dy)


def page_crashed() -> UpstreamError:
    return UpstreamError(
        "the page crashed (its renderer process died, often from running out of memory); "
        "retry, or visit a lighter page",
        reason="crashed",
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]
