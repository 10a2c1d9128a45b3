"""What the ingester moves around: stream entries, their rows, batch tokens, counters.

Pure helpers (no Redis, no ClickHouse), shared by the stream side
(``audit.ingest_stream``), the write side (``audit.ingest_write``) and the loop
(``audit.ingester``).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field

from audit.events import validate

__all__ = [
    "Entry",
    "Line",
    "Stats",
    "StoreDown",
    "batch_token",
    "entry_lines",
    "event_count",
    "event_id",
    "shape_problem",
]

Entry = tuple[bytes, dict[bytes, bytes]]  # (stream id, fields); fields[b"e"]: rows, one a line
Line = tuple[bytes, int, bytes]  # (stream id, line number in the entry, one row)


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
    """The store is unwell (not the data): keep the batch and retry with backoff."""


def batch_token(ids: list[bytes]) -> str:
    """Same entries, same token: what lets ClickHouse drop a retried insert."""
    h = hashlib.blake2b(b",".join(ids), digest_size=16).hexdigest()
    return f"audit:{ids[0].decode()}:{len(ids)}:{h}"


def event_id(blob: bytes) -> str:
    """The canonical event_id of one row, or "" when the row is not a valid event."""
    row, _ = validate(blob)
    return str(uuid.UUID(row["event_id"])) if row else ""


def shape_problem(fields: dict[bytes, bytes]) -> str:
    """Why an entry cannot be rows at all (dead-lettered whole), or "" if it may be."""
    blob = fields.get(b"e")
    if blob is None:
        return f"no 'e' field (fields: {sorted(k.decode('utf-8', 'replace') for k in fields)[:5]})"
    if not (blob.startswith(b"{") and blob.endswith(b"}")):
        return "payload is not JSON objects, one per line"
    return ""


def entry_lines(entries: list[Entry]) -> list[Line]:
    """Every row of ``entries``, tagged with its entry id and line number."""
    return [
        (entry_id, n, line)
        for entry_id, fields in entries
        for n, line in enumerate(fields[b"e"].split(b"\n"))
    ]


def event_count(fields: dict[bytes, bytes]) -> int:
    """Events packed in one entry (one a line; an entry without rows counts as one)."""
    return fields.get(b"e", b"").count(b"\n") + 1
