"""Waiting for action results on asyncio, without a thread per wait.

``ActionHandle.result`` blocks its thread until the result lands; an asyncio program (an
MCP server, an async agent loop) with hundreds of actions in flight would need as many
threads, and pays a thread hand-off per action. ``ResultWaiter`` waits for any number of
results on one pub/sub connection of the event loop: a wait subscribes to the result's
channel (where the worker publishes it as it stores it), waits for Redis to confirm the
subscription, then reads the stored result (so a result stored before the subscription is
not missed) and otherwise waits for the message. Every ``poll_s`` it reads the stored result
again, so a message lost to a broker restart costs a delay, never the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from celery import states

__all__ = ["READY", "RESULT_PREFIX", "ResultWaiter"]

log = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"  # Celery's result key (and channel) for a task id
_CONFIRM_S = 5.0
READY = frozenset(states.READY_STATES)


def _meta(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


class ResultWaiter:
    """Waits for the stored results of tasks, on the event loop it was created on."""

    def __init__(self, url: str, *, poll_s: float = 5.0) -> None:
        self._client = aioredis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self.poll_s = poll_s
        # channel -> the waits on it: each its future and the states that end it
        self._waiting: dict[str, list[tuple[asyncio.Future[dict[str, Any]], frozenset[str]]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        *,
        until: frozenset[str] = READY,
        start: Callable[[], object] | None = None,
    ) -> dict[str, Any] | None:
        """The task's result meta (``status``, ``result``…) once its state is one of
        ``until`` (by default a final one); None when ``timeout`` seconds pass first.
        ``start`` (a function, or a coroutine function) is called once the subscription
        is in place: sending the action there means its result cannot be published
        unseen, and the subscription's round trip is not added to the wait."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        channel = RESULT_PREFIX + task_id
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        first = channel not in self._waiting
        entry = (future, until)
        self._waiting.setdefault(channel, []).append(entry)
        try:
            if first:
                await self._subscribe(channel)
            if start is not None:
                started = start()
                if inspect.isawaitable(started):
                    await started
            while True:
                meta = _meta(await self._client.get(channel))
                if meta is not None and meta.get("status") in until:
                    return meta
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return None
                step = self.poll_s if left is None else min(self.poll_s, left)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), step)
        finally:
            waiters = self._waiting.get(channel, [])
            if entry in waiters:
                waiters.remove(entry)
            if not waiters:
                self._waiting.pop(channel, None)
                self._confirmed.pop(channel, None)
                # Off the caller's path: the result is in hand, the unsubscription can follow.
                task = asyncio.create_task(self._unsubscribe(channel))
                self._chores.add(task)
                task.add_done_callback(self._chores.discard)

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self._waiting:  # waited for again meanwhile: keep it
            return
        with contextlib.suppress(Exception):
            await self._pubsub.unsubscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        confirmed = self._confirmed[channel] = asyncio.Event()
        await self._pubsub.subscribe(channel)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="actionfleet-results")
        # Until Redis confirms, a result published now could pass unseen: the read of the
        # stored result must come after. Without a confirmation the polling still finds it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), _CONFIRM_S)

    async def _read(self) -> None:
        while self._waiting:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped: polling covers the gap
                log.warning("result subscription interrupted (%s); retrying", exc)
                await asyncio.sleep(0.2)
                continue
            if message is None:
                continue
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else channel
            if message["type"] == "subscribe":
                event = self._confirmed.get(channel)
                if event is not None:
                    event.set()
            elif message["type"] == "message":
                meta = _meta(message["data"])
                if meta is not None:
                    for future, until in self._waiting.get(channel, []):
                        if meta.get("status") in until and not future.done():
                            future.set_result(meta)

    async def close(self) -> None:
        for chore in list(self._chores):
            with contextlib.suppress(BaseException):
                await chore
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        await self._client.aclose()
