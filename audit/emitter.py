"""``AuditMiddleware``: the pipeline's lifecycle events into a Redis stream.

Workers never open ClickHouse. ``on_event`` only snapshots the event and appends it to
an in-process buffer (microseconds, no lock); a background thread wakes every
``linger_s`` (or as soon as a chunk is full), then redacts, encodes and XADDs everything
buffered in pipelined chunks, many events per stream entry (``audit.events.pack``). The
linger is what keeps the stream cheap under load: one round trip per batch of events
instead of one per event, at the price of up to ``linger_s`` of audit delay. When Redis
is unreachable, events wait in memory and, past a bound (or at close), in durable spool
files that any later emitter on the same spool dir replays. Nothing is dropped and the
action is never failed or slowed by the audit path.

It is a pipeline middleware by shape (the four hooks of ``workers.middleware.Middleware``)
rather than by inheritance, so the audit package never imports the worker side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from audit.config import DEFAULT_SENSITIVE_FIELDS, STREAM
from audit.events import EventSnapshot, build, encode, pack, snapshot
from audit.spool import Spool

__all__ = ["AuditMiddleware"]

log = logging.getLogger(__name__)


class AuditMiddleware:
    def __init__(
        self,
        redis_url: str,
        *,
        stream: str = STREAM,
        spool_dir: Path | str | None = None,
        sensitive_fields: frozenset[str] | set[str] = DEFAULT_SENSITIVE_FIELDS,
        preview_bytes: int = 4_096,
        max_buffer: int = 10_000,
        chunk: int = 500,
        redis_timeout_s: float = 2.0,
        close_timeout_s: float = 5.0,
        linger_s: float = 0.1,
    ) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self.spool = Spool(Path(spool_dir or Path(".actionfleet") / "audit-spool"))
        self.sensitive_fields = frozenset(f.lower() for f in sensitive_fields)
        self.preview_bytes = preview_bytes
        self.max_buffer = max_buffer
        self.chunk = chunk
        self.redis_timeout_s = redis_timeout_s
        self.close_timeout_s = close_timeout_s
        self.linger_s = linger_s
        self.sent = 0  # events XADDed by this process (tests and `status` read it)
        self.spilled = 0
        self._pid = -1
        self._closing = False
        self._start_lock = threading.Lock()
        # deque.append/popleft are atomic under the GIL: the action thread never waits on
        # a lock or wakes the flusher per event (a queue.Queue did both).
        self._pending: deque[EventSnapshot] = deque()
        self._wake = threading.Event()
        self._backlog: deque[bytes] = deque()  # encoded, waiting for Redis
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._redis: redis.Redis | None = None
        self._down_since: float | None = None

    # -- the action thread ---------------------------------------------------------------

    def before_execute(self, ctx: Any) -> None:
        """Nothing to check before an action: the audit trail only listens."""

    def after_execute(self, ctx: Any, result: Any) -> None:
        """Nothing: the ``finished`` event carries the result."""

    def on_event(self, event: Any) -> None:
        """Buffer one ``workers.middleware.LifecycleEvent``; never raises."""
        try:
            snap = snapshot(event)
            self._ensure_thread()
            if len(self._pending) >= self.max_buffer:
                # The flusher is far behind (Redis down for long): keep the event on disk
                # rather than block the action or drop the event.
                self._spill([encode(self._build(snap))])
                return
            self._pending.append(snap)
            self._idle.clear()
            if len(self._pending) >= self.chunk:
                self._wake.set()
        except Exception:  # the audit trail must never fail an action
            log.exception("audit: could not record a %s event", getattr(event, "stage", "?"))

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._pid != os.getpid():  # forked: the parent's queue and socket are not ours
                self._pending = deque()
                self._backlog = deque()
                self._redis = None
                self._pid = os.getpid()
                self._thread = None
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="audit-emitter", daemon=True)
                self._thread.start()

    # -- the background thread -----------------------------------------------------------

    def _build(self, snap: EventSnapshot) -> dict[str, Any]:
        return build(snap, self.sensitive_fields, self.preview_bytes)

    def _client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.redis_url,
                socket_timeout=self.redis_timeout_s,
                socket_connect_timeout=self.redis_timeout_s,
                retry=Retry(NoBackoff(), 0),  # we retry ourselves, without blocking anyone
            )
        return self._redis

    def _xadd(self, blobs: list[bytes]) -> None:
        with self._client().pipeline(transaction=False) as pipe:
            for payload in pack(blobs):
                pipe.xadd(self.stream, {"e": payload})
            pipe.execute()
        self.sent += len(blobs)

    def _drain_pending(self, wait_s: float) -> None:
        if wait_s > 0:
            self._wake.wait(wait_s)
        self._wake.clear()
        batch: list[EventSnapshot] = []
        with contextlib.suppress(IndexError):
            while len(batch) < self.chunk * 4:
                batch.append(self._pending.popleft())
        for snap in batch:
            try:
                self._backlog.append(encode(self._build(snap)))
            except Exception:  # never lose the others because one could not be built
                log.exception("audit: could not encode event %s", snap.event_id)

    def _push(self) -> None:
        """Send spooled files, then the in-memory backlog. Raises on a Redis error."""
        if self._down_since is not None or self.spool.pending():
            self.spool.replay(self._xadd, self.chunk)
        while self._backlog:
            n = min(self.chunk, len(self._backlog))
            blobs = [self._backlog[i] for i in range(n)]
            self._xadd(blobs)
            for _ in range(n):
                self._backlog.popleft()

    def _run(self) -> None:
        delay = 0.05
        last_spool_check = 0.0
        while True:
            stopping = self._stop.is_set()
            self._drain_pending(0.0 if stopping else (delay if self._down_since else self.linger_s))
            now = time.monotonic()
            if not self._backlog and not self._pending and self._down_since is None:
                if now - last_spool_check > 5.0:  # pick up files other processes left
                    last_spool_check = now
                    with contextlib.suppress(Exception):
                        if self.spool.pending():
                            self._push()
                self._idle.set()
                if stopping:
                    return
                continue
            try:
                self._push()
                if self._down_since is not None:
                    log.warning("audit: Redis reachable again; backlog sent")
                self._down_since, delay = None, 0.05
            except (redis.RedisError, OSError) as exc:
                if self._down_since is None:
                    self._down_since = now
                    log.warning("audit: Redis unreachable (%s); events wait", exc)
                self._redis = None
                if len(self._backlog) >= self.max_buffer:
                    self._spill_backlog()
                if stopping:
                    return
                delay = min(delay * 2, 1.0)
                time.sleep(delay)

    def _spill_backlog(self) -> None:
        blobs = list(self._backlog)
        self._spill(blobs)
        self._backlog.clear()

    def _spill(self, blobs: list[bytes]) -> None:
        self.spool.write(blobs)
        self.spilled += len(blobs)

    # -- lifecycle -----------------------------------------------------------------------

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything emitted so far reached Redis. False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                return not self._pending and not self._backlog
            self._wake.set()  # no lingering: someone is waiting
            if self._idle.wait(0.02) and not self._pending and not self._backlog:
                return True
        return False

    def close(self) -> None:
        """Flush what can be flushed in ``close_timeout_s``; spool the rest to disk."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._thread is not None and self._pid == os.getpid():
                self.flush(self.close_timeout_s)
                self._stop.set()
                self._wake.set()  # out of its linger now, not after it
                self._thread.join(self.close_timeout_s)
            if self._thread is None or not self._thread.is_alive():
                leftovers = list(self._backlog)
                while self._pending:
                    leftovers.append(encode(self._build(self._pending.popleft())))
                if leftovers:
                    self._spill(leftovers)
                    self._backlog.clear()
                    log.warning("audit: %d events spooled to %s", len(leftovers), self.spool.dir)
        finally:
            if self._redis is not None:
                with contextlib.suppress(Exception):
                    self._redis.close()
            self._closing = False
