"""``ActionClient``: what an agent uses to send actions and wait for their results.

With a producer key (``key=`` or ``ACTIONFLEET_KEY``) every action is signed before it is
sent (``producer.auth``); with ``ACTIONFLEET_BROKER_AUTH=key`` the client also logs in to
Redis as the key's ACL user, which may publish actions and read its tenant's results only.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import orjson
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from redis import RedisError
from redis.exceptions import NoPermissionError

from producer.async_results import READY, ResultWaiter
from producer.auth import ProducerKey
from producer.batch import DEFAULT_WINDOW, BatchRunner
from producer.config import ProducerSettings, producer_settings, with_credentials
from producer.errors import FleetUnavailable, InvalidAction, ResultTimeout, UnsupportedPrimitive
from producer.models import Action, ActionResult, queue_for, task_name_for
from producer.publish import Outgoing, RedisPublisher, redis_url
from producer.transport import (
    AWAITING_APPROVAL_STATE,
    RESULT_KEY_PREFIX,
    LazyWatchRedisBackend,
    celery_conf,
    kwargs_repr,
    redis_priority,
    task_id_for,
)
from producer.validation import parse_action

READY_STATES = states.READY_STATES
_POLL_S = 5.0  # how often a long wait double-checks the stored result
_FIRST_POLL_S = 0.5
_PUBLISH_SLICE = 512  # messages per round trip at most
_PUBLISH_BYTES = 32 * 1024 * 1024  # and message bytes


class _Parked(Exception):
    """Raised from the result listener: the action awaits approval (not final)."""

    def __init__(self, value: Any) -> None:
        super().__init__("awaiting approval")
        self.value = value


__all__ = ["SUPPORTED_PRIMITIVES", "ActionClient", "ActionHandle", "validate_action"]

# Primitives with an executor in this version of the fleet. Sending another one would
# leave the action waiting on a queue nobody serves, so the client refuses it up front.
SUPPORTED_PRIMITIVES: tuple[str, ...] = ("code", "files", "api", "email", "browse")


def validate_action(action: Any, primitives: Sequence[str] = SUPPORTED_PRIMITIVES) -> Action:
    """Validate without a broker. Raises ``InvalidAction`` (or ``UnsupportedPrimitive``)."""
    parsed = parse_action(action)
    if parsed.primitive not in primitives:
        raise UnsupportedPrimitive(parsed.primitive, list(primitives))
    return parsed


def _until(final: bool) -> frozenset[str]:
    """The stored states that end an asyncio wait: ``awaiting_approval`` too unless
    ``final`` (as ``ActionHandle.result``)."""
    return READY if final else READY | {AWAITING_APPROVAL_STATE}


class ActionHandle:
    """A submitted action. ``result()`` waits for and returns its ``ActionResult``."""

    def __init__(
        self, action: Action, async_result: AsyncResult | None = None, *, app: Celery | None = None
    ) -> None:
        """``async_result``: Celery's handle on the action's result, or None to make it
        from ``app`` on first use (a batch of thousands never needs most of them)."""
        self.action = action
        self.action_id = action.action_id
        self.primitive = action.primitive
        self.task_id = task_id_for(action.tenant_id, action.action_id)
        self._given = async_result
        self._app = app

    @cached_property
    def _async(self) -> AsyncResult:
        if self._given is not None:
            return self._given
        assert self._app is not None, "ActionHandle needs an AsyncResult or a Celery app"
        return self._app.AsyncResult(self.task_id)

    def ready(self) -> bool:
        return self._async.ready()

    def stored(self) -> ActionResult | None:
        """The result already stored for this action, or None (one read, no wait)."""
        meta = self._async.backend.get_task_meta(self.task_id, cache=False)
        if meta.get("status") not in READY_STATES:
            return None
        return self._outcome(meta.get("result"), meta.get("status"))

    def result(self, timeout: float | None = None, *, final: bool = False) -> ActionResult:
        """Wait up to ``timeout`` seconds (None: forever). Raises ``ResultTimeout``.

        An action a rule parked for a human's approval returns ``awaiting_approval`` at
        once (``result.final`` is False); call again with ``final=True`` (or pass it
        the first time) to wait past it for the decided run's result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        task_id = self.task_id

        def parked(meta: dict[str, Any]) -> None:  # every result message the client hears
            mine = not final and meta.get("task_id") == task_id
            if mine and meta.get("status") == AWAITING_APPROVAL_STATE:
                raise _Parked(meta.get("result"))

        first = True
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            # A short first wait: a park stored before we subscribed is only read back here.
            step = (
                (_FIRST_POLL_S if first else _POLL_S)
                if left is None
                else min(_FIRST_POLL_S if first else _POLL_S, left)
            )
            first = False
            try:
                value = self._async.get(timeout=step, propagate=False, on_message=parked)
                break
            except _Parked as park:
                return ActionResult.model_validate(park.value)
            except CeleryTimeout:
                # The result is announced over pub/sub; a broker restart can drop that
                # message, so also read the stored result directly before waiting again.
                try:
                    meta = self._async.backend.get_task_meta(task_id, cache=False)
                except Exception:  # the broker is down right now: keep waiting
                    meta = {}
                if meta.get("status") in READY_STATES:
                    value = meta.get("result")
                    break
                if meta.get("status") == AWAITING_APPROVAL_STATE and not final:
                    return ActionResult.model_validate(meta.get("result"))
                if left is not None and left <= step:
                    raise ResultTimeout(
                        f"no result for action {self.action_id} after {timeout}s; it may still run"
                    ) from None
        return self._outcome(value, self._async.state)

    async def aresult(
        self, waiter: ResultWaiter, timeout: float | None = None, *, final: bool = False
    ) -> ActionResult:
        """``result`` for asyncio: waits on ``waiter`` (``ActionClient.waiter()``), no
        thread blocked; ``awaiting_approval`` ends the wait unless ``final``. Raises
        ``ResultTimeout``."""
        meta = await waiter.wait(self.task_id, timeout, until=_until(final))
        return self._awaited(meta, timeout)

    def _awaited(self, meta: dict[str, Any] | None, timeout: float | None) -> ActionResult:
        if meta is None:
            raise ResultTimeout(
                f"no result for action {self.action_id} after {timeout}s; it may still run"
            )
        if meta.get("status") == AWAITING_APPROVAL_STATE:
            return ActionResult.model_validate(meta.get("result"))
        return self._outcome(meta.get("result"), meta.get("status"))

    def _outcome(self, value: Any, state: str | None) -> ActionResult:
        if isinstance(value, dict) and "status" in value:
            return ActionResult.model_validate(value)
        # The task itself crashed (it never should: the pipeline catches everything).
        return ActionResult(
            action_id=self.action_id,
            primitive=self.primitive,
            status="failed",
            error={
                "type": "internal_error",
                "message": f"worker task ended in state {state}: {value!r}"[:500],
                "retryable": True,
                "details": {},
            },
        )

    def __repr__(self) -> str:
        return f"<ActionHandle {self.primitive} {self.action_id}>"


class ActionClient:
    """Send actions to the fleet's per-primitive queues and collect their results.

    Validation happens before anything is sent: an invalid action raises
    ``InvalidAction`` (with field-level errors) and nothing reaches the broker.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        *,
        settings: ProducerSettings | None = None,
        primitives: Sequence[str] = SUPPORTED_PRIMITIVES,
        key: str | ProducerKey | None = None,
    ) -> None:
        self.settings = settings or producer_settings()
        url = broker_url or self.settings.resolved_broker_url()
        if not url:
            raise FleetUnavailable(
                "no broker configured: set ACTIONFLEET_BROKER_URL or start a fleet with "
                f"`actionfleet up` (looked for {self.settings.fleet_file()})"
            )
        if key is None:
            key = self.settings.resolved_key()
        try:
            self.key = ProducerKey.parse(key) if isinstance(key, str) else key
        except ValueError as exc:
            raise InvalidAction(
                [
                    {
                        "field": "key",
                        "reason": str(exc),
                        "fix": "use the key printed once by "
                        "`actionfleet keys create` (or `keys rotate`)",
                    }
                ]
            ) from None
        backend = self.settings.result_backend
        if self.key is not None and self.settings.resolved_broker_auth() == "key":
            user, password = self.key.redis_credentials()
            url = with_credentials(url, user, password)
            backend = with_credentials(backend, user, password) if backend else None
        if not redis_url(url):
            raise FleetUnavailable(
                f"the broker must be Redis (redis:// or rediss://), not "
                f"{url.split('://', 1)[0]}://: the fleet's queues are Redis lists"
            )
        self.broker_url = url
        self.primitives = tuple(primitives)
        self._app = Celery("actionfleet-client", set_as_current=False)
        self._app.conf.update(
            celery_conf(self.settings.model_copy(update={"result_backend": backend}), url)
        )
        self._waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ResultWaiter] = (
            weakref.WeakKeyDictionary()
        )
        if urlsplit(self._app.conf.result_backend).scheme in ("redis", "rediss"):
            self._app.backend_cls = LazyWatchRedisBackend
        # Straight to the queues' Redis lists (producer/publish.py), not Celery's send_task.
        self._publisher = RedisPublisher(self._app, url)
        self._mget = True  # until the broker's ACL refuses it (see stored_results)

    # -- validation -------------------------------------------------------------------

    def validate(self, action: Any) -> Action:
        return validate_action(action, self.primitives)

    # -- sending ----------------------------------------------------------------------

    def send(self, action: Action, message: dict[str, Any] | None = None) -> ActionHandle:
        """Enqueue an action ``validate`` returned (``message``: its signed message, when
        the caller signed it already); returns at once with a handle."""
        self._publish([self._outgoing(action, self._signed(action, message))])
        return self.handle_for(action)

    def _signed(self, action: Action, message: dict[str, Any] | None) -> dict[str, Any]:
        if message is None:
            message = action.model_dump(mode="json", by_alias=True)
            if self.key is not None:
                message = self.key.sign(message)
        return message

    def _outgoing(self, action: Action, message: dict[str, Any]) -> Outgoing:
        return self._publisher.build(
            task_name_for(action.primitive),
            queue_for(action.primitive),
            {"message": message},
            task_id=task_id_for(action.tenant_id, action.action_id),
            priority=redis_priority(action.priority),
            kwargsrepr=kwargs_repr(action.primitive, action.action_id, action.tenant_id),
        )

    def _publish(self, messages: Sequence[Outgoing]) -> None:
        try:
            self._publisher.publish(messages)
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def _apublish(self, messages: Sequence[Outgoing]) -> None:
        try:
            await self._publisher.apublish(messages)
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: RedisError) -> FleetUnavailable:
        return FleetUnavailable(f"broker at {self._safe_url()} did not take the action: {exc}")

    def submit(self, action: Any) -> ActionHandle:
        """Validate and enqueue one action; returns at once with a handle."""
        return self.send(self.validate(action))

    def submit_many(self, actions: Iterable[Any]) -> list[ActionHandle]:
        """Validate every action first, then enqueue them all; all or nothing is sent.

        Raises ``InvalidAction`` with ``index`` set to the first bad action's position.
        With a producer key the batch is signed as one Merkle tree per 256 actions (each
        action still proves itself alone): cheaper to sign and to verify.
        """
        parsed: list[Action] = []
        for index, action in enumerate(actions):
            try:
                parsed.append(self.validate(action))
            except InvalidAction as exc:
                raise InvalidAction(exc.errors, index=index) from None
        return self.send_many(parsed)

    def send_many(self, actions: list[Action]) -> list[ActionHandle]:
        """Enqueue actions ``validate`` returned, signed as one batch: one Merkle tree and
        one signature per 256 actions, not one per action (``producer.auth.sign_many``)."""
        messages = [a.model_dump(mode="json", by_alias=True) for a in actions]
        if self.key is not None:
            messages = self.key.sign_many(messages)
        # One round trip per slice of at most _PUBLISH_SLICE messages or _PUBLISH_BYTES:
        # the slice is held in this process's memory, and each of its LPUSHes in Redis's,
        # until Redis has taken it (12 MB actions at 512 a slice would pass its 1 GB cap).
        pending: list[Outgoing] = []
        size = 0
        for action, message in zip(actions, messages, strict=True):
            pending.append(self._outgoing(action, message))
            size += len(pending[-1].payload)
            if len(pending) >= _PUBLISH_SLICE or size >= _PUBLISH_BYTES:
                self._publish(pending)
                pending, size = [], 0
        if pending:
            self._publish(pending)
        return [self.handle_for(a) for a in actions]

    def stored_results(self, handles: Sequence[ActionHandle]) -> list[dict[str, Any] | None]:
        """The stored result (JSON, as the worker wrote it) of each handle, or None where
        there is none yet: one MGET for all of them."""
        if not handles:
            return []
        keys = [RESULT_KEY_PREFIX + h.task_id for h in handles]
        client = self._app.backend.client
        if self._mget:
            try:
                raws = client.mget(keys)
            except NoPermissionError:
                # A fleet whose producer ACL users predate MGET (`actionfleet keys acl`
                # re-applies them): the same reads as a pipeline of GETs.
                self._mget = False
        if not self._mget:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            raws = pipe.execute()
        out: list[dict[str, Any] | None] = []
        for handle, raw in zip(handles, raws, strict=True):
            # Plain JSON, as Celery's JSON serializer wrote it (and as the asyncio waiter
            # reads it): kombu's decoder costs several times more per result.
            meta = orjson.loads(raw) if raw else None
            if meta is None or meta.get("status") not in READY_STATES:
                out.append(None)
                continue
            value = meta.get("result")
            ok = isinstance(value, dict) and "status" in value
            out.append(
                value if ok else handle._outcome(value, meta.get("status")).model_dump(mode="json")
            )
        return out

    def send_signed(self, task: str, queue: str, message: dict[str, Any], task_id: str) -> None:
        """Sign ``message`` with this client's key (when it has one) and send it as
        ``task`` to ``queue``: how fleet-owned work (workflows) is handed over."""
        if self.key is not None:
            message = self.key.sign(message)
        kwargs = {"message": message}
        self._publish([self._publisher.build(task, queue, kwargs, task_id=task_id)])

    def async_result(self, task_id: str) -> AsyncResult:
        """Celery's handle on whatever the fleet stores under ``task_id``."""
        return self._app.AsyncResult(task_id)

    def handle_for(self, action: Action) -> ActionHandle:
        """A handle on an action sent earlier (by this or another process): its result
        is kept under the same task id."""
        return ActionHandle(action, app=self._app)

    def run(
        self, action: Any, timeout: float | None = None, *, final: bool = False
    ) -> ActionResult:
        """Submit and wait for the result (``final``: wait past ``awaiting_approval``)."""
        return self.submit(action).result(timeout=timeout, final=final)

    def waiter(self) -> ResultWaiter:
        """The result waiter of the running event loop (one per loop, made on first use)."""
        loop = asyncio.get_running_loop()
        found = self._waiters.get(loop)
        if found is None:
            backend = str(self._app.conf.result_backend or self.broker_url)
            found = self._waiters[loop] = ResultWaiter(backend, poll_s=_POLL_S)
        return found

    async def arun(
        self, action: Any, timeout: float | None = None, *, final: bool = False
    ) -> ActionResult:
        """``run`` for asyncio: submit, then wait without blocking the event loop's thread
        (the submission itself is one short Redis write)."""
        parsed = self.validate(action)
        handle = self.handle_for(parsed)

        async def start() -> None:
            await self._apublish([self._outgoing(parsed, self._signed(parsed, None))])

        # Sent once the result's channel is subscribed: no round trip of its own to wait.
        meta = await self.waiter().wait(
            handle.task_id,
            timeout,
            until=_until(final),
            start=start,
        )
        return handle._awaited(meta, timeout)

    def batch(
        self,
        actions: Iterable[Any],
        *,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
        timeout: float | None = None,
        batch_id: str | None = None,
    ) -> Iterator[ActionResult]:
        """Stream ``actions`` through the fleet, at most ``window`` in flight and ``rate``
        sent per second; yields one result per action, in input order. An invalid action
        yields its ``invalid`` result (with field-level errors) and the batch goes on.
        Actions without ``action_id``/``idempotency_key`` get ones derived from
        ``batch_id`` and their 1-based position, so the same batch id sent again runs
        nothing twice (docs/batch.md)."""
        runner = BatchRunner(self, batch_id=batch_id, window=window, rate=rate, timeout=timeout)
        for entry in runner.stream(enumerate(actions, 1)):
            result = entry.result
            # An invalid line may lack an id or a primitive; the model wants strings.
            ident = {"action_id": result["action_id"] or "", "primitive": result["primitive"] or ""}
            yield ActionResult.model_validate(result | ident)

    # -- lifecycle --------------------------------------------------------------------

    def _safe_url(self) -> str:
        # Never echo a password that may be embedded in the broker URL.
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.broker_url))

    def close(self) -> None:
        self._publisher.close()
        self._app.close()

    async def aclose(self) -> None:
        """Close the running loop's result waiter, then the client."""
        waiter = self._waiters.pop(asyncio.get_running_loop(), None)
        if waiter is not None:
            await waiter.close()
        await self._publisher.aclose()
        self.close()

    def __enter__(self) -> ActionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
