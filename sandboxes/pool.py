"""A warm pool for a sandbox backend: pre-started containers, each used by ONE run.

A cold run pays create + start before the program can begin, and remove after it
(``sandboxes/docker.py``, ``sandboxes/runc.py``). The runner (PID 1) blocks reading its
framed request on stdin before doing anything, so those steps can happen ahead of time: a
*warm* container was created with stdin open, connected and started, and is waiting
(``WarmBackend.start_warm``). A run takes one, sends it the request (the per-run nonce is
in the request, so nothing inside could know it in advance), reads the frame and decides
the outcome exactly as a cold run does (``run_warm``); the container is then removed in
the background once its runner has exited by itself (``retire``; a kill would cost more).
It is never handed out again, whatever happened in it (exit, timeout, OOM, error).

Profiles: a warm container is only usable by a run whose limits it was created with. The
profile is what is fixed at create time: runtime, image, memory, CPUs, pids, tmpfs size.
Timeout and output caps travel in the request. Runs with a workspace mount (a per-tenant
bind mount) or a profile with no warm container take the cold path (the backend's ``run``).

Sizing: per profile, the pool keeps ``peak concurrent runs in the last demand window +
max(1, runs/s over the last 5 s x seconds to get a warm container ready)`` warm (or
being-made) containers, capped by ``max_per_profile``; a profile with no demand in the
window is drained (prewarmed profiles keep one); surplus is retired only then. All warm
containers together are capped by ``max_memory_mb`` (counted at their memory limit, an
upper bound of what they can use).

Leftovers: pooled containers carry the sandbox labels (``actionfleet.sandbox=1``, owner
``<host>:<pid>``, expiry) plus ``actionfleet.pool=1`` (OCI annotations under runc), so the
backend's ``reap`` removes them once their worker process is gone (the worker's start-up
reaper) or they expire. The pool
retires a warm container at half its TTL and never hands out one whose expiry could fall
inside the run, so a live pool's containers are never reaped under it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

from producer.errors import SandboxError
from sandboxes.base import Limits, RunOutcome, RunSpec, Runtime, Warm, WarmBackend
from sandboxes.reaper import (
    EXPIRY_SLACK_S,
    LABEL_EXPIRES,
    LABEL_OWNER,
    LABEL_RUNTIME,
    LABEL_SANDBOX,
    owner_label,
)

__all__ = ["LABEL_POOL", "PooledDockerSandbox", "PooledSandbox", "Profile"]

log = logging.getLogger(__name__)

LABEL_POOL = "actionfleet.pool"
DEFAULT_TTL_S = 600.0
DEFAULT_DEMAND_WINDOW_S = 60.0
# How often the refill loop looks at the pool when nothing wakes it (retirement, draining).
TICK_S = 1.0
# Concurrent Docker calls of the pool (creates, and removals that first wait for the
# container's own exit): refill must keep up with a sustained stream of runs, each of
# which consumes one container, while used ones are waited for.
DEFAULT_WORKERS = 6
# A start that fails keeps failing (image gone, runtime broken): back off before retrying.
FAILURE_BACKOFF_S = 5.0
# Sizing under sustained demand: runs per second are counted over this window, and the time
# from asking for a warm container to having it is smoothed with this weight per sample.
RATE_WINDOW_S = 5.0
READY_EWMA_WEIGHT = 0.3


@dataclass(frozen=True, slots=True)
class Profile:
    """What a container is created with; runs match a warm container only on all of it."""

    runtime: Runtime
    image: str
    memory_mb: int
    cpus: float
    pids: int
    tmpfs_mb: int

    @classmethod
    def of(cls, runtime: Runtime, image: str, limits: Limits) -> Profile:
        return cls(runtime, image, limits.memory_mb, limits.cpus, limits.pids, limits.tmpfs_mb)

    def limits(self) -> Limits:
        return Limits(
            memory_mb=self.memory_mb, cpus=self.cpus, pids=self.pids, tmpfs_mb=self.tmpfs_mb
        )


@dataclass(slots=True)
class _Demand:
    in_flight: int = 0
    last_used: float = 0.0  # monotonic; 0 = never
    peaks: deque[tuple[float, int]] | None = None  # (monotonic, in_flight at a take)

    def note_start(self, now: float) -> None:
        self.in_flight += 1
        self.last_used = now
        if self.peaks is None:
            self.peaks = deque()
        self.peaks.append((now, self.in_flight))

    def peak(self, now: float, window_s: float) -> int:
        if not self.peaks:
            return 0
        while self.peaks and self.peaks[0][0] < now - window_s:
            self.peaks.popleft()
        return max((n for _, n in self.peaks), default=0)

    def rate(self, now: float, window_s: float) -> float:
        """Runs started per second over the last ``window_s`` (within the demand window)."""
        if not self.peaks:
            return 0.0
        recent = 0
        for started, _ in reversed(self.peaks):
            if started < now - window_s:
                break
            recent += 1
        return recent / window_s


class PooledSandbox:
    """``Sandbox`` serving runs from warm containers, falling back to the backend's ``run``.

    ``sandbox``: the backend (``DockerSandbox`` or ``RuncSandbox``; its image, runtime and
    grace are used; it is closed by ``close()``). ``max_per_profile``: most warm
    containers of one profile.
    ``max_memory_mb``: cap on the sum of the memory limits of all warm containers.
    ``prewarm``: limits whose profile is kept warm (>= 1) even with no demand yet.
    """

    def __init__(
        self,
        sandbox: WarmBackend,
        *,
        max_per_profile: int = 4,
        max_memory_mb: int = 2048,
        ttl_s: float = DEFAULT_TTL_S,
        demand_window_s: float = DEFAULT_DEMAND_WINDOW_S,
        prewarm: tuple[Limits, ...] = (),
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if max_per_profile < 1:
            raise ValueError("max_per_profile must be >= 1 (use the backend alone for no pool)")
        self.cold = sandbox
        self.runtime: Runtime = sandbox.runtime
        self.max_per_profile = max_per_profile
        self.max_memory_mb = max_memory_mb
        self.ttl_s = ttl_s
        self.demand_window_s = demand_window_s
        self._lock = threading.Condition()
        self._warm: dict[Profile, deque[Warm]] = {}
        self._creating: dict[Profile, int] = {}
        self._demand: dict[Profile, _Demand] = {}
        self._failed_at: dict[Profile, float] = {}
        self._prewarm = {Profile.of(self.runtime, sandbox.image, lim) for lim in prewarm}
        self._closed = False
        self._pending: set[Future[Any]] = set()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sandbox-pool")
        self.stats = {"warm_runs": 0, "cold_runs": 0, "created": 0, "discarded": 0}
        # Seconds from asking for a warm container to having it (smoothed); 0 = not measured.
        self.ready_s = 0.0
        self._thread = threading.Thread(target=self._refill_loop, name="sandbox-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ Sandbox protocol

    def run(self, spec: RunSpec) -> RunOutcome:
        """Run ``spec`` in a warm container if one fits, else in a cold one."""
        profile = Profile.of(self.runtime, self.cold.image, spec.limits)
        poolable = spec.workspace is None
        if poolable:
            with self._lock:
                self._demand.setdefault(profile, _Demand()).note_start(time.monotonic())
                self._lock.notify_all()  # the refill loop replaces what we take
        try:
            warm = self._take(profile, spec.limits) if poolable else None
            with self._lock:
                self.stats["cold_runs" if warm is None else "warm_runs"] += 1
            if warm is None:
                return self.cold.run(spec)
            return self._run_warm(warm, spec)
        finally:
            if poolable:
                with self._lock:
                    self._demand[profile].in_flight -= 1

    def reap(self) -> int:
        """Remove leftovers of dead workers (never this pool's own: its owner is alive)."""
        return self.cold.reap()

    def close(self) -> None:
        """Stop refilling and remove every warm container; waits for pending removals."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            warm = [w for entries in self._warm.values() for w in entries]
            self._warm.clear()
            self._lock.notify_all()
        self._thread.join(timeout=10)
        for entry in warm:
            self._discard(entry)
        # Creates in flight see _closed and remove their container themselves.
        self._executor.shutdown(wait=True)
        self.cold.close()

    def warm_count(self, limits: Limits | None = None) -> int:
        """Warm containers waiting (of the profile of ``limits``, or all)."""
        with self._lock:
            if limits is None:
                return sum(len(d) for d in self._warm.values())
            return len(self._warm.get(Profile.of(self.runtime, self.cold.image, limits), ()))

    def warm_ids(self) -> list[str]:
        with self._lock:
            return [w.id for d in self._warm.values() for w in d]

    # ------------------------------------------------------------------ taking and running

    def _take(self, profile: Profile, limits: Limits) -> Warm | None:
        # The container's expiry must lie beyond the whole run, or another process's reaper
        # could remove it mid-run.
        needed = limits.timeout_s + self.cold.kill_grace_s + EXPIRY_SLACK_S
        stale: list[Warm] = []
        taken = None
        with self._lock:
            entries = self._warm.get(profile)
            while entries:
                entry = entries.popleft()
                if entry.expires - time.time() >= needed and self.cold.warm_alive(entry):
                    taken = entry
                    break
                stale.append(entry)
        for entry in stale:
            self._discard(entry)
        return taken

    def _run_warm(self, warm: Warm, spec: RunSpec) -> RunOutcome:
        try:
            return self.cold.run_warm(warm, spec)
        finally:
            # Used once, whatever happened: removed off the caller's critical path, after the
            # runner's own exit (it exits right after its frame) rather than killed.
            self._submit(self.cold.retire, warm)

    # ------------------------------------------------------------------ refilling

    def _idle(self, profile: Profile, now: float) -> bool:
        demand = self._demand.get(profile)
        return demand is None or now - demand.last_used > self.demand_window_s

    def _target(self, profile: Profile, now: float) -> int:
        """Warm containers to keep: the peak of concurrent runs, plus what the runs started
        while a replacement is being made will take (Little's law: rate x time to ready;
        at least 1), so a sustained stream does not drain the pool onto the cold path."""
        demand = self._demand.get(profile)
        floor = 1 if profile in self._prewarm else 0
        if demand is None or self._idle(profile, now):
            return floor
        ahead = max(1, math.ceil(demand.rate(now, RATE_WINDOW_S) * self.ready_s))
        peak = demand.peak(now, self.demand_window_s)
        return min(self.max_per_profile, max(floor, peak + ahead))

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                to_create, to_retire = self._plan()
            for entry in to_retire:
                self._discard(entry)
            for profile in to_create:
                self._submit(self._create_warm, profile, time.monotonic())
            with self._lock:
                if self._closed:
                    return
                self._lock.wait(TICK_S)

    def _plan(self) -> tuple[list[Profile], list[Warm]]:
        """Under the lock: which warm containers to create and which to retire now."""
        now, wall = time.monotonic(), time.time()
        to_retire: list[Warm] = []
        for profile, entries in self._warm.items():
            # Surplus is retired only once the profile's demand is gone (drained): while
            # runs keep coming, a container made for a rate that has since dipped is still
            # used soon, and retiring it would waste a whole container lifecycle.
            keep = self._target(profile, now) if self._idle(profile, now) else len(entries)
            kept: deque[Warm] = deque()
            for entry in entries:
                too_old = wall - entry.created > self.ttl_s / 2
                if too_old or len(kept) >= keep or not self.cold.warm_alive(entry):
                    to_retire.append(entry)
                else:
                    kept.append(entry)
            self._warm[profile] = kept
        memory = sum(
            p.memory_mb * (len(self._warm.get(p, ())) + self._creating.get(p, 0))
            for p in set(self._warm) | set(self._creating)
        )
        to_create: list[Profile] = []
        for profile in set(self._demand) | self._prewarm:
            if now - self._failed_at.get(profile, -FAILURE_BACKOFF_S) < FAILURE_BACKOFF_S:
                continue
            have = len(self._warm.get(profile, ())) + self._creating.get(profile, 0)
            for _ in range(self._target(profile, now) - have):
                if memory + profile.memory_mb > self.max_memory_mb:
                    break
                memory += profile.memory_mb
                self._creating[profile] = self._creating.get(profile, 0) + 1
                to_create.append(profile)
        return to_create, to_retire

    def _labels(self) -> dict[str, str]:
        return {
            LABEL_SANDBOX: "1",
            LABEL_POOL: "1",
            LABEL_OWNER: owner_label(),
            LABEL_EXPIRES: str(int(time.time() + self.ttl_s) + 1),
            LABEL_RUNTIME: self.runtime,
        }

    def _create_warm(self, profile: Profile, asked: float) -> None:
        """Start one warm container (``asked``: when the refill loop asked for it,
        monotonic; the wait in the executor's queue counts towards ``ready_s``)."""
        warm: Warm | None = None
        try:
            warm = self.cold.start_warm(profile.limits(), self._labels())
            with self._lock:
                if not self._closed:
                    self._warm.setdefault(profile, deque()).append(warm)
                    self.stats["created"] += 1
                    took = time.monotonic() - asked
                    w = READY_EWMA_WEIGHT if self.ready_s else 1.0
                    self.ready_s = (1 - w) * self.ready_s + w * took
                    warm = None  # handed to the pool
        except SandboxError as exc:
            log.warning("could not start a warm sandbox container: %s", exc)
            with self._lock:
                self._failed_at[profile] = time.monotonic()
        finally:
            with self._lock:
                self._creating[profile] -= 1
            if warm is not None:  # the pool closed meanwhile
                self.cold.retire(warm)

    def _discard(self, entry: Warm) -> None:
        with self._lock:
            self.stats["discarded"] += 1
        self._submit(self.cold.retire, entry)

    def _submit(self, fn: Any, *args: Any) -> None:
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # executor shut down (close() raced us): do it inline
            with contextlib.suppress(Exception):
                fn(*args)
            return
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def settle(self, timeout_s: float = 60.0) -> bool:
        """Wait until no create or remove is in flight and nothing is left to create (for
        tests and benchmarks; a run never needs it). False if ``timeout_s`` passed first."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                pending = set(self._pending)
                busy = bool(pending) or any(self._creating.values()) or self._wants_more()
            if not busy:
                return True
            if pending:
                futures_wait(pending, timeout=0.2)
            else:
                time.sleep(0.05)
        return False

    def _wants_more(self) -> bool:
        """Under the lock: would the refill loop create a container now (memory cap aside)?"""
        now = time.monotonic()
        memory = sum(p.memory_mb * len(d) for p, d in self._warm.items())
        for profile in set(self._demand) | self._prewarm:
            if now - self._failed_at.get(profile, -FAILURE_BACKOFF_S) < FAILURE_BACKOFF_S:
                continue
            short = self._target(profile, now) - len(self._warm.get(profile, ()))
            if short > 0 and memory + profile.memory_mb <= self.max_memory_mb:
                return True
        return False


# The name from when the pool had one backend (Docker).
PooledDockerSandbox = PooledSandbox
