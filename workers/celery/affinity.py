"""Pinning a worker to CPU cores (``actionfleet worker --cpus``, ``ACTIONFLEET_WORKER_CPUS``).

A trivial action is a few hundred microseconds of Python between Redis round trips, so a
worker sleeps and wakes thousands of times a second. Left to float, the scheduler moves it
between cores at those wake-ups and it runs on cold caches. Two workers pinned one per
core on 2 cores drained a median 12 % more actions per second than the same two floating
(-9 to +26 % over six same-run comparisons), with ~8 % less CPU per action, and scaled
1.72-1.91x over one worker (benchmarks/README.md). Pinning is what
Kubernetes' static CPU manager does for a Guaranteed pod with whole CPUs; this does it
for a worker started by hand or by compose.

The worker's main process is pinned to the whole set, so everything it starts inherits
it. With several CPUs in the set and no more prefork pool processes than CPUs, pool
process ``i`` is pinned to the ``i``-th CPU, so ``--concurrency`` processes over as many
cores do not trade places either; with more processes than CPUs they float within the set.
"""

from __future__ import annotations

import os

__all__ = [
    "CpuSpecError",
    "available_cpus",
    "checked",
    "parse_cpus",
    "pin",
    "pin_pool_process",
    "pool_cpus",
]


MAX_CPU = 8191  # the kernel's NR_CPUS tops out at 8192


class CpuSpecError(ValueError):
    """A CPU list that cannot be parsed, or names CPUs this process may not run on."""


def parse_cpus(spec: str) -> tuple[int, ...]:
    """``"0"``, ``"0-3"``, ``"0,2,4-5"`` -> sorted distinct CPU numbers (the kernel's
    cpuset list format, as ``taskset -c`` and compose's ``cpuset`` take it)."""
    cpus: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise CpuSpecError(
                f"CPU list {spec!r}: {part!r} is not a CPU number or a range like 0-3;"
                " write e.g. 0, 0-3 or 0,2"
            )
        first, last = int(low), int(high) if dash else int(low)
        if last > MAX_CPU:  # and no set of a billion numbers built from a typo
            raise CpuSpecError(
                f"CPU list {spec!r}: CPU {last} is past the kernel's largest ({MAX_CPU})"
            )
        if last < first:
            raise CpuSpecError(
                f"CPU list {spec!r}: range {part!r} runs backwards; write {last}-{first}"
            )
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def available_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its own affinity: a container's cpuset, taskset)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def _format(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


def checked(spec: str) -> tuple[int, ...]:
    """``parse_cpus`` plus: every CPU is one this process may run on."""
    cpus = parse_cpus(spec)
    allowed = available_cpus()
    outside = [c for c in cpus if c not in allowed]
    if outside:
        raise CpuSpecError(
            f"CPU list {spec!r}: CPU {_format(tuple(outside))} is not available to this"
            f" process, which may run on {_format(allowed)}; pick CPUs from that list"
        )
    return cpus


def pin(spec: str) -> tuple[int, ...]:
    """Pin the calling process (and whatever it starts from now on) to ``spec``."""
    cpus = checked(spec)
    os.sched_setaffinity(0, cpus)
    return cpus


def pool_cpus(cpus: tuple[int, ...], processes: int) -> tuple[int, ...] | None:
    """The CPUs prefork pool processes are pinned to, one each in turn, or None when they
    float within the worker's set: it has one CPU (inherited already), or there are more
    processes than CPUs (pinned in turn, two busy ones could share a core while another
    idles; floating, the scheduler balances them)."""
    return cpus if len(cpus) > 1 and processes <= len(cpus) else None


def pin_pool_process(cpus: tuple[int, ...], index: int) -> int:
    """Pin prefork pool process number ``index`` to its CPU of ``cpus`` (wrapping: a
    replacement process gets its index's CPU again)."""
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, (cpu,))
    return cpu
