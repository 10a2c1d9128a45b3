"""Streaming batches: any number of actions through a bounded window, results in input order.

``BatchRunner.stream`` reads its input lazily and keeps at most ``window`` actions in
flight: memory is bounded by the window, not by the input. Results come out in input
order (a finished action waits for the ones before it, at most ``window`` of them).
Every action of a batch gets an action id and an idempotency key derived from the batch
id and its line number (``batch_action_id``, ``batch_idempotency_key``), so sending a
line again -- after the batch process died -- is the same Celery task with the same
idempotency key, which the fleet answers from its record instead of running it again.
``producer.journal`` makes a batch resumable; ``actionfleet batch`` and
``ActionClient.batch`` are the two ways in. docs/batch.md states the guarantees.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from producer.errors import InvalidAction, ResultTimeout
from producer.models import Action, ActionResult

__all__ = [
    "BATCH_NAMESPACE",
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "BatchEntry",
    "BatchRunner",
    "BatchSummary",
    "batch_action_id",
    "batch_idempotency_key",
    "local_result",
]

# Fixed: action ids of a batch line must be the same in every process and release.
BATCH_NAMESPACE = uuid.UUID("5d3f0c2e-8d8e-4b7a-9a59-6a1f3b0c9e41")
DEFAULT_WINDOW = 1000
# Celery buffers at most 8192 result messages that arrive before their waiter asks;
# a window below that never loses one to the buffer.
MAX_WINDOW = 5000


def batch_action_id(batch_id: str, line: int) -> str:
    """The action id of input line ``line`` (1-based) of batch ``batch_id``."""
    return str(uuid.uuid5(BATCH_NAMESPACE, f"{batch_id}/{line}"))


def batch_idempotency_key(batch_id: str, line: int) -> str:
    return f"batch:{batch_id}:{line}"


def local_result(
    raw: Any, status: str, error_type: str, message: str, **details: Any
) -> dict[str, Any]:
    """A result made on the producer's side (invalid input, gave up waiting): the shape of
    a worker's, with ``attempt`` 0 (nothing ran here)."""
    action_id = raw.get("action_id") if isinstance(raw, dict) else None
    primitive = raw.get("primitive") if isinstance(raw, dict) else None
    return {
        "action_id": action_id if isinstance(action_id, str) else None,
        "primitive": primitive if isinstance(primitive, str) else None,
        "status": status,
        "output": None,
        "error": {
            "type": error_type,
            "message": message,
            "retryable": error_type != "validation_error",
            "details": details,
        },
        "attempt": 0,
        "started_at": None,
        "finished_at": None,
        "duration_ms": 0,
        "worker": None,
    }


class _Handle(Protocol):
    action_id: str
    primitive: str

    def result(self, timeout: float | None = None) -> ActionResult: ...

    def stored(self) -> ActionResult | None: ...


class _Client(Protocol):
    """What a batch needs of ``ActionClient`` (duck-typed: the client imports this module)."""

    def validate(self, action: Any) -> Action: ...

    def send(self, action: Action) -> _Handle: ...

    def send_many(self, actions: list[Action]) -> list[_Handle]: ...

    def handle_for(self, action: Action) -> _Handle: ...

    def stored_results(self, handles: Any) -> list[dict[str, Any] | None]: ...


@dataclass(slots=True)
class BatchEntry:
    """One input line's outcome. ``sent``: this run published it; ``resent``: an earlier
    run may have published it too (the fleet runs it once: same task, same idempotency
    key); ``reused``: an earlier run's stored result, nothing sent."""

    line: int
    result: dict[str, Any]
    sent: bool = False
    resent: bool = False
    reused: bool = False

    @property
    def status(self) -> str:
        return str(self.result.get("status"))

    @property
    def error_type(self) -> str | None:
        error = self.result.get("error")
        return error.get("type") if isinstance(error, dict) else None


@dataclass
class BatchSummary:
    """Counts by status and error type, and what was sent, of one run of a batch."""

    batch_id: str
    total: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    error_types: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    resent: int = 0
    reused: int = 0
    earlier: int = 0  # results written by an earlier run (resume), not counted above
    started: float = field(default_factory=time.monotonic)

    def add(self, entry: BatchEntry) -> None:
        self.total += 1
        self.statuses[entry.status] += 1
        if entry.error_type:
            self.error_types[entry.error_type] += 1
        self.sent += entry.sent
        self.resent += entry.resent
        self.reused += entry.reused

    @property
    def all_succeeded(self) -> bool:
        return self.statuses.get("succeeded", 0) == self.total

    def to_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {
            "batch_id": self.batch_id,
            "total": self.total,
            **dict(sorted(self.statuses.items())),
            "error_types": dict(sorted(self.error_types.items())),
            "sent": self.sent,
            "resent": self.resent,
            "reused": self.reused,
            "earlier": self.earlier,
            "elapsed_s": round(elapsed, 2),
            "per_s": round((self.total - self.earlier) / elapsed, 1) if elapsed > 0 else 0.0,
        }


class _Pacer:
    """At most ``rate`` sends per second, evenly spaced (no bursts after a pause)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next > now:
            time.sleep(self.next - now)
        self.next = max(self.next, now) + self.interval


@dataclass(slots=True)
class _Slot:
    line: int
    handle: _Handle | None = None
    result: dict[str, Any] | None = None  # known: local (invalid), reused, or fetched
    sent: bool = False
    resent: bool = False
    reused: bool = False


# Collecting results: the oldest in-flight actions are read in one round trip (an MGET)
# (no subscription or read per action: at thousands a second the client's CPU is taken
# from the workers on the same machine). While the oldest is not done, the runner polls
# every POLL_S -- the window keeps the fleet busy meanwhile -- and after PATIENCE_S (or
# with a small window, where a poll would add latency) it waits on that one result.
POLL_S = 0.02
PATIENCE_S = 2.0
SMALL_WINDOW = 32
SEND_CHUNK = 64  # lines signed and sent together (one Ed25519 signature, producer.auth)
FETCH_FIRST, FETCH_MIN, FETCH_MAX = 16, 4, 512  # results read per round trip
_RATE_MEMORY = 0.8  # weight of the past in the estimated rate of results


class BatchRunner:
    """Runs one batch through ``client``: ``stream(items)`` yields a ``BatchEntry`` per
    item, in input order. ``rate`` caps sends per second; ``timeout`` caps the wait for
    each result once it is the oldest in flight (None: wait for ever)."""

    def __init__(
        self,
        client: _Client,
        *,
        batch_id: str | None = None,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
        timeout: float | None = None,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise InvalidAction(
                [
                    {
                        "field": "window",
                        "reason": f"{window} is outside 1..{MAX_WINDOW}",
                        "fix": f"use a window between 1 and {MAX_WINDOW} actions in flight",
                    }
                ]
            )
        if rate is not None and rate <= 0:
            raise InvalidAction(
                [{"field": "rate", "reason": f"{rate} is not positive", "fix": "use e.g. 100"}]
            )
        self.client = client
        self.batch_id = batch_id or uuid.uuid4().hex
        self.window = window
        self.timeout = timeout
        self._pacer = _Pacer(rate)
        # Lines signed and sent together (one signature for them all, send_many): a
        # quarter of the window at most, and one at a time under a rate cap, so each send
        # keeps its own pace and a fresh signature.
        self._chunk_n = 1 if rate else max(1, min(SEND_CHUNK, window // 4))
        self._fetch_n = FETCH_FIRST
        # Results found and seconds elapsed, both decayed per read: their ratio is the
        # recent rate at which results land, which sizes the next read.
        self._found_recent = 0.0
        self._time_recent = 0.0
        self._last_fetch: float | None = None
        self._head: _Slot | None = None
        self._head_since = 0.0

    def prepare(self, line: int, raw: Any) -> Action | dict[str, Any]:
        """The validated action of ``line`` with the batch's action id and idempotency key
        where the line names none, or its ``invalid`` result."""
        if isinstance(raw, dict):
            raw = dict(raw)
            raw.setdefault("action_id", batch_action_id(self.batch_id, line))
            raw.setdefault("idempotency_key", batch_idempotency_key(self.batch_id, line))
        try:
            return self.client.validate(raw)
        except InvalidAction as exc:
            ident = raw if isinstance(raw, dict) else {}
            return local_result(
                ident, "invalid", "validation_error", str(exc), errors=exc.errors, line=line
            )

    def stream(
        self,
        items: Iterable[tuple[int, Any]],
        *,
        maybe_sent: Callable[[int], bool] | None = None,
        before_send: Callable[[int], None] | None = None,
    ) -> Iterator[BatchEntry]:
        """``items``: (line number, raw action) pairs, line numbers increasing.
        ``maybe_sent(line)``: an earlier run may have sent it -- its stored result is
        looked up first. ``before_send(line)`` runs before a line is published (the
        journal's write-ahead mark)."""
        inflight: deque[_Slot] = deque()
        chunk: list[tuple[int, Any]] = []
        for line, raw in items:
            chunk.append((line, raw))
            if len(chunk) < self._chunk_n:
                continue
            inflight.extend(self._start(chunk, maybe_sent, before_send))
            chunk = []
            # Room for the next chunk: at most ``window`` in flight once it is sent.
            while len(inflight) > self.window - self._chunk_n:
                yield from self._ready(inflight)
        inflight.extend(self._start(chunk, maybe_sent, before_send))
        while inflight:
            yield from self._ready(inflight)

    def _ready(self, inflight: deque[_Slot]) -> Iterator[BatchEntry]:
        """The entries at the head of ``inflight`` whose results are in (maybe none: then
        it has waited a poll interval, or for the oldest one)."""
        head = inflight[0]
        if head.result is None:
            now = time.monotonic()
            if self._head is not head:
                self._head, self._head_since = head, now
            waited = now - self._head_since
            if len(inflight) < SMALL_WINDOW or self.window < SMALL_WINDOW or waited > PATIENCE_S:
                self._fetch(inflight)
                if head.result is None:
                    self._wait(head, waited)
            else:
                # At most one read per poll interval: reading sooner finds little.
                since = POLL_S if self._last_fetch is None else now - self._last_fetch
                if since < POLL_S:
                    time.sleep(POLL_S - since)
                self._fetch(inflight)
        while inflight and inflight[0].result is not None:
            yield self._entry(inflight.popleft())

    def _fetch(self, inflight: deque[_Slot]) -> None:
        """Read the stored results of the oldest unfinished actions in one round trip:
        about as many as have likely finished since the last read (each read of a result
        not yet there is CPU taken from the workers on the same machine), twice as many
        as last time when every one read was in."""
        pending = []
        for slot in inflight:
            if slot.result is None:
                pending.append(slot)
                if len(pending) >= self._fetch_n:
                    break
        found = 0
        for slot, result in zip(
            pending, self.client.stored_results([s.handle for s in pending]), strict=True
        ):
            if result is not None:
                slot.result, found = result, found + 1
        now = time.monotonic()
        elapsed = POLL_S if self._last_fetch is None else now - self._last_fetch
        self._last_fetch = now
        self._found_recent = self._found_recent * _RATE_MEMORY + found
        self._time_recent = self._time_recent * _RATE_MEMORY + elapsed
        if found == len(pending):
            self._fetch_n = min(FETCH_MAX, self._fetch_n * 2)
        else:
            # Read again after a poll interval: the results of about that long, and a few.
            rate = self._found_recent / max(self._time_recent, 1e-3)
            self._fetch_n = max(FETCH_MIN, min(FETCH_MAX, int(rate * POLL_S * 1.25) + FETCH_MIN))

    def _wait(self, slot: _Slot, waited: float) -> None:
        assert slot.handle is not None
        left = None if self.timeout is None else max(0.0, self.timeout - waited)
        try:
            slot.result = slot.handle.result(timeout=left).model_dump(mode="json")
        except ResultTimeout as exc:  # the action may still run: say so
            ident = {"action_id": slot.handle.action_id, "primitive": slot.handle.primitive}
            slot.result = local_result(ident, "failed", "timeout", str(exc), line=slot.line)

    def _start(
        self,
        chunk: list[tuple[int, Any]],
        maybe_sent: Callable[[int], bool] | None,
        before_send: Callable[[int], None] | None,
    ) -> list[_Slot]:
        """The slots of ``chunk``, in order: invalid lines and earlier runs' stored results
        at once, the rest sent together."""
        slots: list[_Slot] = []
        to_send: list[tuple[_Slot, Action]] = []
        for line, raw in chunk:
            prepared = self.prepare(line, raw)
            if isinstance(prepared, dict):
                slots.append(_Slot(line, result=prepared))
                continue
            earlier = maybe_sent is not None and maybe_sent(line)
            if earlier:
                stored = self.client.handle_for(prepared).stored()
                if stored is not None:
                    slots.append(_Slot(line, result=stored.model_dump(mode="json"), reused=True))
                    continue
            if before_send is not None:
                before_send(line)  # the journal's mark, before anything of it is sent
            slot = _Slot(line, sent=True, resent=earlier)
            slots.append(slot)
            to_send.append((slot, prepared))
        if to_send:
            self._pacer.wait()
            handles = self.client.send_many([a for _, a in to_send])
            for (slot, _), handle in zip(to_send, handles, strict=True):
                slot.handle = handle
        return slots

    @staticmethod
    def _entry(slot: _Slot) -> BatchEntry:
        assert slot.result is not None
        return BatchEntry(slot.line, slot.result, slot.sent, slot.resent, slot.reused)
