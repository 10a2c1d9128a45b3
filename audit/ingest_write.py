"""The ingester's ClickHouse side: one deduplicated INSERT, and the recovery look-ups.

Every function takes an open clickhouse-connect client and raises ``StoreDown`` when the
store is unwell; ``insert_rows`` raises ``ValueError`` when ClickHouse rejects the data
itself (so the caller splits the batch instead of retrying it).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from audit.events import validate
from audit.ingest_batch import Line, StoreDown, batch_token
from audit.schema import DATABASE, RESULTS_COLUMNS, RESULTS_SELECT

__all__ = ["EVENTS_TABLE", "already_stored", "error_code", "insert_rows", "repair_results"]

# One logger name for the whole ingester, whichever module the code lives in.
log = logging.getLogger("audit.ingester")

EVENTS_TABLE = f"{DATABASE}.audit_events"

# ClickHouse error codes that mean "this data is bad", not "the store is unwell".
_DATA_ERRORS = {6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 321, 376, 407, 457, 467, 469}
_CODE = re.compile(r"Code: (\d+)")


def error_code(exc: BaseException) -> int | None:
    m = _CODE.search(str(exc))
    return int(m.group(1)) if m else None


def insert_rows(client: Any, blobs: list[bytes], token: str) -> None:
    """INSERT one block of JSONEachRow lines; raises StoreDown, or ValueError for bad data."""
    try:
        client.raw_insert(
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
        if error_code(exc) in _DATA_ERRORS:
            raise ValueError(str(exc)[:1000]) from exc
        raise StoreDown(str(exc)) from exc


def already_stored(client: Any, lines: list[Line]) -> set[str]:
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
    rows = client.query(
        f"SELECT toString(event_id) FROM {EVENTS_TABLE} WHERE event_id IN ({ids}) "
        f"AND event_time BETWEEN '{min(times)}' AND '{max(times)}'"
    ).result_rows
    return {r[0] for r in rows}


def repair_results(client: Any, event_ids: set[str]) -> None:
    """A kill between the two tables' writes of one INSERT leaves a finished event
    without its ``action_results`` row: add the missing ones from ``audit_events``."""
    ids = ",".join(f"'{e}'" for e in sorted(event_ids))  # validated UUIDs
    try:
        missing = [
            r[0]
            for r in client.query(
                f"SELECT toString(event_id) FROM {EVENTS_TABLE} WHERE stage = 'finished' "
                f"AND event_id IN ({ids}) AND event_id NOT IN (SELECT event_id FROM "
                f"{DATABASE}.action_results WHERE event_id IN ({ids}))"
            ).result_rows
        ]
        if missing:
            wanted = ",".join(f"'{e}'" for e in missing)
            client.command(
                f"INSERT INTO {DATABASE}.action_results ({', '.join(RESULTS_COLUMNS)}) "
                f"{RESULTS_SELECT} "
                f"AND event_id IN ({wanted})",
                settings={
                    "insert_deduplication_token": "repair:"
                    + batch_token([m.encode() for m in missing])
                },
            )
            log.warning("repaired %d missing action_results rows", len(missing))
    except Exception as exc:
        raise StoreDown(str(exc)) from exc
