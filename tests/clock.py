"""Keeping tests clear of calendar boundaries that real workers see on their own clock.

A worker subprocess reads the wall clock itself (monthly quota keys, ``resets_at``), so a
test cannot inject ``now`` there; it waits out the rare minutes next to a month's end
instead, so the outcome never depends on the date or on how long the run takes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from workers.guarantees.limits import month_reset

__all__ = ["clear_of_month_end"]


def clear_of_month_end(margin: timedelta = timedelta(minutes=5)) -> datetime:
    """Now, at least ``margin`` before the next UTC month; waits past a month's start
    when closer (at most ``margin``, a few minutes a month)."""
    now = datetime.now(UTC)
    left = month_reset(now) - now
    if left < margin:
        time.sleep(left.total_seconds() + 1)
        now = datetime.now(UTC)
    return now
