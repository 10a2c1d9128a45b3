"""Keeps the leases of running actions alive from one background thread per process.

A lease (idempotency claim, concurrency slot) must outlive its action however long the
action runs, yet expire soon after its worker dies. So leases are short (``lease_s``)
and renewed every ``lease_s / 3`` while the action runs; a SIGKILLed worker renews
nothing and its leases lapse within ``lease_s``. The guard holds one renewal per running
action, which renews its claim and its lease together (``Reliability._renew``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["LeaseKeeper"]

log = logging.getLogger(__name__)

Renew = Callable[[], object]


class LeaseKeeper:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._renewals: dict[int, Renew] = {}
        self._next = 0
        self._pid = -1
        self._wake = threading.Event()

    def hold(self, renew: Renew) -> int:
        """Renew with ``renew`` until ``drop`` is called with the returned handle."""
        with self._lock:
            self._ensure_thread()
            self._next += 1
            self._renewals[self._next] = renew
            return self._next

    def drop(self, handle: int) -> None:
        with self._lock:
            self._renewals.pop(handle, None)

    def _ensure_thread(self) -> None:
        # Started lazily and per process: a thread does not survive Celery's fork.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._renewals.clear()
            threading.Thread(target=self._run, name="lease-keeper", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            with self._lock:
                renewals = list(self._renewals.values())
            for renew in renewals:
                try:
                    renew()
                except Exception:  # Redis away: the next round tries again
                    log.warning("lease renewal failed", exc_info=True)
