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

import argparse
import contextlib
import hashlib
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from audit.config import DEAD_STREAM, GROUP, STREAM
from audit.events import validate
from audit.schema import DATABASE, RESULTS_SELECT
from audit.store import connect, endpoint_file, migrate
from producer.procs import pid_alive

__all__ = ["Ingester", "main"]

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields); fields[b"e"]: rows, one a line
Line = tuple[bytes, int, bytes]  # (stream id, line number in the entry, one row)
EVENTS_TABLE = f"{DATABASE}.audit_events"

# ClickHouse error codes that mean "this data is bad", not "the store is unwell".
_DATA_ERRORS = {6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 321, 376, 407, 457, 467, 469}
_CODE = re.compile(r"Code: (\d+)")


def _error_code(exc: BaseException) -> int | None:
    m = _CODE.search(str(exc))
    return int(m.group(1)) if m else None


def _event_id(blob: bytes) -> str:
    row, _ = validate(blob)
    return str(uuid.UUID(row["event_id"])) if row else ""


def batch_token(ids: list[bytes]) -> str:
    """Same entries, same token: what lets ClickHouse drop a retried insert."""
    h = hashlib.blake2b(b",".join(ids), digest_size=16).hexdigest()
    return f"audit:{ids[0].decode()}:{len(ids)}:{h}"


@dataclass
class Stats:
    inserted: int = 0
    batches: int = 0
    dead_lettered: int = 0
    recovered: int = 0
    skipped_duplicates: int = 0
    store_errors: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.time)


class StoreDown(Exception):
    pass


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
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=3)
        self.client: Any = None
        self.query_server: Any = None
        self._buf: list[Entry] = []
        self._buf_since = 0.0
        self._buf_events = 0
        self._per_entry = 10.0  # recent events per stream entry (adapts after a read)
        self._stuck: list[Entry] = []  # a batch the store refused for now; retried first
        self._stuck_recovered = False
        self._unacked: list[bytes] = []  # inserted but XACK failed (Redis blip)
        self._group_ready = False
        self._next_claim = 0.0
        self._backoff = 0.0
        self._stopping = False
        self._prefetch: queue.Queue[list[Entry]] | None = None  # read-ahead (run_forever)

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

    def _insert(self, blobs: list[bytes], token: str) -> None:
        """INSERT one block of JSONEachRow lines; raises StoreDown, or ValueError for bad data."""
        try:
            self.client.raw_insert(
                EVENTS_TABLE,
                insert_block=b"\n".join(blobs),
                fmt="JSONEachRow",
                settings={
                    "insert_deduplication_token": token,
                    "input_format_skip_unknown_fields": 1,  # newer emitters, older schema
                    "deduplicate_blocks_in_dependent_materialized_views": 1,
                },
            )
        except Exception as exc:
            if _error_code(exc) in _DATA_ERRORS:
                raise ValueError(str(exc)[:1000]) from exc
            raise StoreDown(str(exc)) from exc

    # -- redis -------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _ack(self, ids: list[bytes]) -> None:
        if not ids:
            return
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
                pipe.execute()
        except redis.RedisError:
            self._unacked.extend(ids)  # inserted already; ack when Redis is back
            raise

    def _dead_letter(self, entries: list[tuple[Entry, str]], lines: list[tuple[Line, str]]) -> None:
        """Park bad entries (whole, acknowledged here) and bad lines (their entry is
        acknowledged by the caller once its good lines are stored) with the reason."""
        if not entries and not lines:
            return
        with self.redis.pipeline(transaction=True) as pipe:
            for (entry_id, fields), reason in entries:
                record: dict[bytes | str, bytes | str] = {
                    "reason": reason[:2000],
                    "entry_id": entry_id,
                    "stream": self.stream,
                    "consumer": self.consumer,
                }
                for k, v in fields.items():
                    record[b"field:" + k] = v
                pipe.xadd(self.dead_stream, record)
            for (entry_id, line_no, blob), reason in lines:
                pipe.xadd(
                    self.dead_stream,
                    {
                        "reason": reason[:2000],
                        "entry_id": entry_id,
                        "line": line_no,
                        "stream": self.stream,
                        "consumer": self.consumer,
                        "payload": blob,
                    },
                )
            if entries:
                ids = [e[0][0] for e in entries]
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
            pipe.execute()
        self.stats.dead_lettered += len(entries) + len(lines)
        for (entry_id, _), reason in entries:
            log.warning("audit entry %s dead-lettered: %s", entry_id.decode(), reason[:200])
        for (entry_id, line_no, _), reason in lines:
            log.warning(
                "audit event %s#%d dead-lettered: %s", entry_id.decode(), line_no, reason[:200]
            )

    # -- one batch ---------------------------------------------------------------------

    @staticmethod
    def _shape_problem(fields: dict[bytes, bytes]) -> str:
        blob = fields.get(b"e")
        if blob is None:
            return (
                f"no 'e' field (fields: {sorted(k.decode('utf-8', 'replace') for k in fields)[:5]})"
            )
        if not (blob.startswith(b"{") and blob.endswith(b"}")):
            return "payload is not JSON objects, one per line"
        return ""

    @staticmethod
    def _lines(entries: list[Entry]) -> list[Line]:
        return [
            (entry_id, n, line)
            for entry_id, fields in entries
            for n, line in enumerate(fields[b"e"].split(b"\n"))
        ]

    def _already_stored(self, lines: list[Line]) -> set[str]:
        """event_ids already in the store, among ``lines`` (recovered entries only)."""
        wanted: set[str] = set()
        times: list[str] = []
        for _, _, blob in lines:
            row, _ = validate(blob)
            if row is not None:
                wanted.add(str(uuid.UUID(row["event_id"])))
                times.append(row["event_time"])
        if not wanted:
            return set()
        ids = ",".join(f"'{e}'" for e in wanted)  # validated UUIDs: safe to inline
        rows = self.client.query(
            f"SELECT toString(event_id) FROM {EVENTS_TABLE} WHERE event_id IN ({ids}) "
            f"AND event_time BETWEEN '{min(times)}' AND '{max(times)}'"
        ).result_rows
        return {r[0] for r in rows}

    def _repair_results(self, event_ids: set[str]) -> None:
        """A kill between the two tables' writes of one INSERT leaves a finished event
        without its ``action_results`` row: add the missing ones from ``audit_events``."""
        ids = ",".join(f"'{e}'" for e in sorted(event_ids))  # validated UUIDs
        try:
            missing = [
                r[0]
                for r in self.client.query(
                    f"SELECT toString(event_id) FROM {EVENTS_TABLE} WHERE stage = 'finished' "
                    f"AND event_id IN ({ids}) AND event_id NOT IN (SELECT event_id FROM "
                    f"{DATABASE}.action_results WHERE event_id IN ({ids}))"
                ).result_rows
            ]
            if missing:
                wanted = ",".join(f"'{e}'" for e in missing)
                self.client.command(
                    f"INSERT INTO {DATABASE}.action_results {RESULTS_SELECT} "
                    f"AND event_id IN ({wanted})",
                    settings={
                        "insert_deduplication_token": "repair:"
                        + batch_token([m.encode() for m in missing])
                    },
                )
                log.warning("repaired %d missing action_results rows", len(missing))
        except Exception as exc:
            raise StoreDown(str(exc)) from exc

    def _process(self, entries: list[Entry], recovered: bool = False) -> None:
        """Insert, dead-letter and acknowledge ``entries``. Raises StoreDown."""
        bad: list[tuple[Entry, str]] = []
        good: list[Entry] = []
        for entry in entries:
            problem = self._shape_problem(entry[1])
            (bad.append((entry, problem)) if problem else good.append(entry))
        self._dead_letter(bad, [])
        if not good:
            return
        ids = [e[0] for e in good]
        token = batch_token(ids)
        if recovered:
            lines = self._lines(good)
            try:
                stored = self._already_stored(lines)
            except Exception as exc:
                raise StoreDown(str(exc)) from exc
            if stored:
                before = len(lines)
                lines = [ln for ln in lines if _event_id(ln[2]) not in stored]
                self.stats.skipped_duplicates += before - len(lines)
                self._repair_results(stored)
            inserted = self._insert_lines(lines, token + ":r") if lines else 0
        else:
            try:  # fast path: the payloads are the rows
                self._insert([e[1][b"e"] for e in good], token)
                inserted = sum(e[1][b"e"].count(b"\n") + 1 for e in good)
            except ValueError:
                inserted = self._insert_lines(self._lines(good), token + ":v")
        if self.pause_after_insert_s:
            log.warning("fault injection: pausing %.1fs before XACK", self.pause_after_insert_s)
            time.sleep(self.pause_after_insert_s)
        self._ack(ids)
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

    # -- recovery ----------------------------------------------------------------------

    def _dead_consumers(self) -> list[str]:
        dead = []
        for c in self.redis.xinfo_consumers(self.stream, self.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == self.consumer:
                continue
            host, _, rest = name.partition(":")
            pid = rest.partition(":")[0]
            if host == self.host and pid.isdigit() and not pid_alive(int(pid)):
                if c.get("pending", 0):
                    dead.append(name)
                else:  # nothing left: tidy XINFO
                    self.redis.xgroup_delconsumer(self.stream, self.group, name)
        return dead

    def _claim(self) -> list[Entry]:
        """Entries of dead consumers: at once for provably dead local ones, else by idle."""
        claimed: list[Entry] = []
        for name in self._dead_consumers():
            pending = self.redis.xpending_range(
                self.stream, self.group, "-", "+", self.batch_size, consumername=name
            )
            ids = [p["message_id"] for p in pending]
            if ids:
                got = self.redis.xclaim(self.stream, self.group, self.consumer, 0, ids)
                claimed += [(i, f) for i, f in got if f is not None]
                deleted = [i for i, f in got if f is None]
                if deleted:  # entry gone from the stream: nothing to insert, just ack
                    self.redis.xack(self.stream, self.group, *deleted)
            if len(claimed) >= self.batch_size:
                return claimed
        res = self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            int(self.claim_idle_s * 1000),
            "0-0",
            count=max(1, self.batch_size - len(claimed)),
        )
        entries = res[1] if len(res) > 1 else []
        claimed += [(i, f) for i, f in entries if f]
        if len(res) > 2 and res[2]:
            self.redis.xack(self.stream, self.group, *res[2])
        return claimed

    def _heartbeat(self) -> None:
        """Keep our own pending entries fresh while the store is down (idle resets)."""
        ids = [e[0] for e in self._stuck]
        if ids:
            with contextlib.suppress(redis.RedisError):
                self.redis.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

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
            self._heartbeat()
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
        self._ensure_group()
        if self._unacked:
            ids, self._unacked = self._unacked, []
            self._ack(ids)
        if self._stuck:
            entries, recovered = self._stuck, self._stuck_recovered
            self._stuck = []
            self._run_batch(entries, recovered)
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, min(self.claim_idle_s / 2, 30.0))
            claimed = self._claim()
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
        events = sum(f.get(b"e", b"").count(b"\n") + 1 for _, f in entries)
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
        res = self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">"},
            count=self._read_count(),
            block=int(wait * 1000),
        )
        if res:
            self._add(res[0][1])

    def _prefetch_loop(self, q: queue.Queue[list[Entry]]) -> None:
        """Reads the next entries while the main thread inserts (chDB and the socket both
        release the GIL, so parsing overlaps the insert). Reads only while the store is up,
        so a backlog stays unread in the stream instead of pending in this process."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=3)
        try:
            while not self._stopping:
                if self.client is None or not self._group_ready or self._stuck or q.full():
                    time.sleep(0.01)
                    continue
                try:
                    res = client.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: ">"},
                        count=self._read_count(),
                        block=200,
                    )
                except redis.RedisError as exc:
                    log.warning("audit stream read failed: %s", exc)
                    time.sleep(0.5)
                    continue
                if res and res[0][1]:
                    q.put(res[0][1])
        finally:
            client.close()

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
        length = int(self.redis.xlen(self.stream))
        try:
            pending = int(self.redis.xpending(self.stream, self.group)["pending"])
        except redis.ResponseError:
            pending = 0
        return {"stream_length": length, "pending": pending}


# ------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m audit.ingester``: the same as ``actionfleet audit ingest``."""
    from audit.cli import add_ingest_arguments, cmd_ingest

    parser = argparse.ArgumentParser(prog="python -m audit.ingester", description=__doc__)
    add_ingest_arguments(parser)
    return cmd_ingest(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
