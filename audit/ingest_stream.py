"""The ingester's Redis side: one consumer in the audit stream's consumer group.

Reads, acknowledges (XACK + XDEL in one MULTI), parks bad data in the dead-letter
stream, and recovers entries left pending by dead consumers. Raises ``redis.RedisError``
as it comes; the loop in ``audit.ingester`` decides what to retry.
"""

from __future__ import annotations

import contextlib
import logging

import redis

from audit.ingest_batch import Entry, Line
from producer.procs import pid_alive

__all__ = ["GroupConsumer"]

# One logger name for the whole ingester, whichever module the code lives in.
log = logging.getLogger("audit.ingester")


class GroupConsumer:
    """``consumer`` of ``group`` on ``stream``, dead-lettering to ``dead_stream``."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str,
        group: str,
        dead_stream: str,
        consumer: str,
        host: str,
    ) -> None:
        self.redis = client
        self.stream, self.group, self.dead_stream = stream, group, dead_stream
        self.consumer, self.host = consumer, host
        self.group_ready = False
        self.unacked: list[bytes] = []  # inserted but XACK failed (Redis blip)

    def ensure_group(self) -> None:
        if self.group_ready:
            return
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.group_ready = True

    def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (``>``), waiting up to ``block_ms``."""
        res = self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
        )
        return res[0][1] if res else []

    # -- acknowledging -----------------------------------------------------------------

    def ack(self, ids: list[bytes]) -> None:
        if not ids:
            return
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, *ids)
                pipe.xdel(self.stream, *ids)
                pipe.execute()
        except redis.RedisError:
            self.unacked.extend(ids)  # inserted already; ack when Redis is back
            raise

    def ack_unacked(self) -> None:
        """Retry the acknowledgement of entries inserted before a Redis blip."""
        if self.unacked:
            ids, self.unacked = self.unacked, []
            self.ack(ids)

    def dead_letter(self, entries: list[tuple[Entry, str]], lines: list[tuple[Line, str]]) -> int:
        """Park bad entries (whole, acknowledged here) and bad lines (their entry is
        acknowledged by the caller once its good lines are stored) with the reason.
        Returns how many were parked."""
        if not entries and not lines:
            return 0
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
        for (entry_id, _), reason in entries:
            log.warning("audit entry %s dead-lettered: %s", entry_id.decode(), reason[:200])
        for (entry_id, line_no, _), reason in lines:
            log.warning(
                "audit event %s#%d dead-lettered: %s", entry_id.decode(), line_no, reason[:200]
            )
        return len(entries) + len(lines)

    # -- recovery ----------------------------------------------------------------------

    def dead_consumers(self) -> list[str]:
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

    def claim(self, batch_size: int, claim_idle_s: float) -> list[Entry]:
        """Entries of dead consumers: at once for provably dead local ones, else by idle."""
        claimed: list[Entry] = []
        for name in self.dead_consumers():
            pending = self.redis.xpending_range(
                self.stream, self.group, "-", "+", batch_size, consumername=name
            )
            ids = [p["message_id"] for p in pending]
            if ids:
                got = self.redis.xclaim(self.stream, self.group, self.consumer, 0, ids)
                claimed += [(i, f) for i, f in got if f is not None]
                deleted = [i for i, f in got if f is None]
                if deleted:  # entry gone from the stream: nothing to insert, just ack
                    self.redis.xack(self.stream, self.group, *deleted)
            if len(claimed) >= batch_size:
                return claimed
        res = self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            int(claim_idle_s * 1000),
            "0-0",
            count=max(1, batch_size - len(claimed)),
        )
        entries = res[1] if len(res) > 1 else []
        claimed += [(i, f) for i, f in entries if f]
        if len(res) > 2 and res[2]:
            self.redis.xack(self.stream, self.group, *res[2])
        return claimed

    def heartbeat(self, ids: list[bytes]) -> None:
        """Keep our own pending entries fresh while the store is down (idle resets)."""
        if ids:
            with contextlib.suppress(redis.RedisError):
                self.redis.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

    def lag(self) -> dict[str, int]:
        """Stream length and this group's pending count (what still waits)."""
        length = int(self.redis.xlen(self.stream))
        try:
            pending = int(self.redis.xpending(self.stream, self.group)["pending"])
        except redis.ResponseError:
            pending = 0
        return {"stream_length": length, "pending": pending}
