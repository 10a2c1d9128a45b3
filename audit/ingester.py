"""The ingester: Redis stream -> ClickHouse, exactly once per event.

Loop: read with a consumer group, batch (flush by size or age), INSERT the batch as
``JSONEachRow`` with an ``insert_deduplication_token`` derived from its entry ids, then
XACK+XDEL. Acknowledging only after the insert means a crash loses nothing; the token
(plus an event_id existence check for entries recovered from a dead consumer) means the
retry does not double count.

- Fast path: stream payloads are already rows, so a healthy batch is joined and sent
  without decoding JSON in Python.
- A batch ClickHouse rejects as bad data is split: the Python validator names bad
  entries, bisection isolates any it missed; bad entries go to the dead-letter stream
  with the reason, the rest is inserted.
- Store down: the batch stays pending in memory and unread entries stay in the stream;
  our pending entries are re-claimed periodically so no other ingester steals them.
- Entries left pending by a dead ingester: claimed at once when its name shows it ran on
  this host and its pid is gone, otherwise after ``claim_idle_s`` (XAUTOCLAIM).

``action_results`` rows come from a materialized view in the same INSERT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any

import redis

from audit.config import DEAD_STREAM, GROUP, STREAM
from audit.events import validate
from audit.ingest_batch import (
    Entry,
    Line,
    Stats,
    StoreDown,
    batch_token,
    entry_lines,
    event_count,
    event_id,
    shape_problem,
)
from audit.ingest_stream import GroupConsumer
from audit.ingest_write import EVENTS_TABLE as EVENTS_TABLE  # re-exported: its old home
from audit.ingest_write import already_stored, insert_rows, repair_results
from audit.store import connect, endpoint_file, migrate

__all__ = ["Ingester"]

log = logging.getLogger(__name__)


class Ingester:
    def __init__(
        self,
        redis_url: str,
        dsn: str,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        dead_stream: str = DEAD_STREAM,
        consumer: str | None = None,
        batch_size: int = 10_000,
        batch_age_s: float = 1.0,
        claim_idle_s: float = 60.0,
        retention_days: int = 365,
        serve_queries: bool = True,
        query_port: int = 0,
        pause_after_insert_s: float = 0.0,
    ) -> None:
        self.redis_url, self.dsn = redis_url, dsn
        self.stream, self.group, self.dead_stream = stream, group, dead_stream
        self.host = socket.gethostname()
        self.consumer = consumer or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.batch_size = batch_size
        self.batch_age_s = batch_age_s
        self.claim_idle_s = claim_idle_s
        self.retention_days = retention_days
        self.serve_queries = serve_queries
        self.query_port = query_port
        # Fault injection for tests: a window between INSERT and XACK to kill us in.
        self.pause_after_insert_s = pause_after_insert_s
        self.stats = Stats()
        self.redis = self._redis_client()
        self.group_consumer = self._group_consumer(self.redis)
        self.client: Any = None
        self.query_server: Any = None
        self._buf: list[Entry] = []
        self._buf_since = 0.0
        self._buf_events = 0
        self._per_entry = 10.0  # recent events per stream entry (adapts after a read)
        self._stuck: list[Entry] = []  # a batch the store refused for now; retried first
        self._stuck_recovered = False
        self._next_claim = 0.0
        self._backoff = 0.0
        self._stopping = False
        self._prefetch: queue.Queue[list[Entry]] | None = None  # read-ahead (run_forever)

    def _redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=3)

    def _group_consumer(self, client: redis.Redis) -> GroupConsumer:
        return GroupConsumer(
            client,
            stream=self.stream,
            group=self.group,
            dead_stream=self.dead_stream,
            consumer=self.consumer,
            host=self.host,
        )

    # -- store -------------------------------------------------------------------------

    def _ensure_store(self) -> bool:
        if self.client is not None:
            return True
        try:
            self.client = connect(self.dsn)
            migrate(self.client, self.retention_days)
        except Exception as exc:
            self._store_failed(exc)
            return False
        log.info("audit store ready: %s", self.dsn)
        if self.serve_queries and self.query_server is None and (ep := endpoint_file(self.dsn)):
            from audit.query_server import QueryServer

            self.query_server = QueryServer(connect(self.dsn), ep, self.query_port)
            self.query_server.start()
            log.info("serving read-only queries on %s", self.query_server.url)
        return True

    def _store_failed(self, exc: BaseException) -> None:
        self.stats.store_errors += 1
        self.stats.last_error = str(exc)[:500]
        if self._backoff == 0:
            log.warning("audit store unavailable (%s); events wait in the stream", exc)
        self._backoff = min(max(self._backoff * 2, 0.2), 5.0)
        if self.client is not None:  # reconnect (and re-check the schema) next step
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None

    # -- one batch ---------------------------------------------------------------------

    def _insert(self, blobs: list[bytes], token: str) -> None:
        insert_rows(self.client, blobs, token)

    def _dead_letter(self, entries: list[tuple[Entry, str]], lines: list[tuple[Line, str]]) -> None:
        self.stats.dead_lettered += self.group_consumer.dead_letter(entries, lines)

    def _process(self, entries: list[Entry], recovered: bool = False) -> None:
        """Insert, dead-letter and acknowledge ``entries``. Raises StoreDown."""
        bad: list[tuple[Entry, str]] = []
        good: list[Entry] = []
        for entry in entries:
            problem = shape_problem(entry[1])
            (bad.append((entry, problem)) if problem else good.append(entry))
        self._dead_letter(bad, [])
        if not good:
            return
        ids = [e[0] for e in good]
        token = batch_token(ids)
        if recovered:
            lines = entry_lines(good)
            try:
                stored = already_stored(self.client, lines)
            except Exception as exc:
                raise StoreDown(str(exc)) from exc
            if stored:
                before = len(lines)
                lines = [ln for ln in lines if event_id(ln[2]) not in stored]
                self.stats.skipped_duplicates += before - len(lines)
                repair_results(self.client, stored)
            inserted = self._insert_lines(lines, token + ":r") if lines else 0
        else:
            try:  # fast path: the payloads are the rows
                self._insert([e[1][b"e"] for e in good], token)
                inserted = sum(event_count(e[1]) for e in good)
            except ValueError:
                inserted = self._insert_lines(entry_lines(good), token + ":v")
        if self.pause_after_insert_s:
            log.warning("fault injection: pausing %.1fs before XACK", self.pause_after_insert_s)
            time.sleep(self.pause_after_insert_s)
        self.group_consumer.ack(ids)
        self.stats.inserted += inserted
        self.stats.batches += 1

    def _insert_lines(self, lines: list[Line], token: str) -> int:
        """Slow path, line by line: dead-letter what the validator rejects, insert the
        rest, bisect if ClickHouse still refuses. Returns the number inserted."""
        checked = [(ln, validate(ln[2])[1]) for ln in lines]
        self._dead_letter([], [(ln, reason) for ln, reason in checked if reason])
        good = [ln for ln, reason in checked if not reason]
        return self._bisect(good, token) if good else 0

    def _bisect(self, lines: list[Line], token: str) -> int:
        try:
            self._insert([ln[2] for ln in lines], token)
            return len(lines)
        except ValueError as exc:
            if len(lines) == 1:
                self._dead_letter([], [(lines[0], f"rejected by ClickHouse: {exc}")])
                return 0
        mid = len(lines) // 2
        # Deterministic sub-tokens: a retry after a crash splits the same way.
        return self._bisect(lines[:mid], f"{token}/{mid}a") + self._bisect(
            lines[mid:], f"{token}/{mid}b"
        )

    # -- the loop ----------------------------------------------------------------------

    def run_once(self) -> int:
        """One step: (re)connect, retry a stuck batch, claim, read, flush. Returns the
        number of events inserted in this step."""
        before = self.stats.inserted
        try:
            self._step()
            self._backoff = 0.0
        except StoreDown as exc:
            self._store_failed(exc)
            self.group_consumer.heartbeat([e[0] for e in self._stuck])
        except redis.RedisError as exc:
            self.stats.last_error = f"redis: {exc}"
            log.warning("audit stream unavailable: %s", exc)
            self._backoff = min(max(self._backoff * 2, 0.2), 5.0)
        if self._backoff:
            time.sleep(self._backoff)
        return self.stats.inserted - before

    def _step(self) -> None:
        if not self._ensure_store():
            raise StoreDown(self.stats.last_error)
        self.group_consumer.ensure_group()
        self.group_consumer.ack_unacked()
        if self._stuck:
            entries, recovered = self._stuck, self._stuck_recovered
            self._stuck = []
            self._run_batch(entries, recovered)
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, min(self.claim_idle_s / 2, 30.0))
            claimed = self.group_consumer.claim(self.batch_size, self.claim_idle_s)
            if claimed:
                self.stats.recovered += len(claimed)
                log.info("claimed %d entries left pending by other ingesters", len(claimed))
                self._run_batch(claimed, recovered=True)
        self._read()
        if self._buf and (
            self._buf_events >= self.batch_size
            or time.monotonic() - self._buf_since >= self.batch_age_s
            or self._stopping
        ):
            entries, self._buf, self._buf_events = self._buf, [], 0
            self._run_batch(entries, recovered=False)

    def _run_batch(self, entries: list[Entry], recovered: bool) -> None:
        try:
            self._process(entries, recovered)
        except StoreDown:
            self._stuck, self._stuck_recovered = entries, recovered
            raise

    def _read_count(self) -> int:
        # batch_size counts events; an entry packs several, so ask for about as many
        # entries as should fill the batch at the recent packing ratio.
        want = self.batch_size - self._buf_events
        return max(1, min(10_000, int(want / self._per_entry)))

    def _add(self, entries: list[Entry]) -> None:
        if not entries:
            return
        if not self._buf:
            self._buf_since = time.monotonic()
        self._buf.extend(entries)
        events = sum(event_count(f) for _, f in entries)
        self._buf_events += events
        self._per_entry = 0.7 * self._per_entry + 0.3 * (events / len(entries))

    def _read(self) -> None:
        if self._buf_events >= self.batch_size or self._stopping:
            return
        wait = self.batch_age_s - (time.monotonic() - self._buf_since if self._buf else 0.0)
        wait = max(0.001, min(wait, 1.0))
        if self._prefetch is not None:
            with contextlib.suppress(queue.Empty):
                self._add(self._prefetch.get(timeout=wait))
                while self._buf_events < self.batch_size:
                    self._add(self._prefetch.get_nowait())
            return
        self._add(self.group_consumer.read(self._read_count(), int(wait * 1000)))

    def _prefetch_loop(self, q: queue.Queue[list[Entry]]) -> None:
        """Reads the next entries while the main thread inserts (chDB and the socket both
        release the GIL, so parsing overlaps the insert). Reads only while the store is up,
        so a backlog stays unread in the stream instead of pending in this process."""
        reader = self._group_consumer(self._redis_client())  # its own connection
        try:
            while not self._stopping:
                if (
                    self.client is None
                    or not self.group_consumer.group_ready
                    or self._stuck
                    or q.full()
                ):
                    time.sleep(0.01)
                    continue
                try:
                    entries = reader.read(self._read_count(), 200)
                except redis.RedisError as exc:
                    log.warning("audit stream read failed: %s", exc)
                    time.sleep(0.5)
                    continue
                if entries:
                    q.put(entries)
        finally:
            reader.redis.close()

    def run_forever(self) -> None:
        log.info("ingester %s: %s -> %s", self.consumer, self.stream, self.dsn)
        self._prefetch = queue.Queue(maxsize=2)
        reader = threading.Thread(
            target=self._prefetch_loop, args=(self._prefetch,), name="audit-read", daemon=True
        )
        reader.start()
        while not self._stopping:
            self.run_once()
        # Drain what we hold (buffer and read-ahead): insert + ack it. Unread entries
        # stay in the stream for the next ingester.
        reader.join(5)
        with contextlib.suppress(queue.Empty):
            while True:
                self._add(self._prefetch.get_nowait())
        with contextlib.suppress(Exception):
            if self._buf or self._stuck:
                self._step()
        self.close()

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def close(self) -> None:
        if self.query_server is not None:
            with contextlib.suppress(Exception):
                self.query_server.stop()
            self.query_server = None
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None
        with contextlib.suppress(Exception):
            self.redis.close()

    def lag(self) -> dict[str, int]:
        """Stream length and this group's pending count (what still waits)."""
        return self.group_consumer.lag()
