"""Fleet-wide rate limits, concurrency leases and monthly quotas, kept in Redis.

Celery's own ``rate_limit`` is per worker instance (ten workers, ten times the limit) and
parks rate-limited tasks in the worker's prefetch buffer. These limits live in Redis and
are checked in one atomic Lua script (``workers.guarantees.admission.ADMIT``, one round trip for an
action's idempotency claim, rate buckets, concurrency lease and quota together), so they
hold across any number of workers. The classes here run one section of it each.

- Rate: GCRA (generic cell rate algorithm), one key per bucket holding its theoretical
  arrival time. An action over its limit *books* the next free slot of every bucket it
  touches (``reserve``) and is re-queued to run at that slot, so deferred actions never
  stampede back and the observed rate stays on the configured one.
- Concurrency: a sorted set of leases (member = lease id, score = expiry in ms). A lease
  is renewed while its action runs (see ``workers.guarantees.leasekeeper``); a dead worker stops
  renewing and its slot returns after ``lease_s``.
- Quota: a counter per tenant (and per tenant x primitive) per calendar month (UTC),
  expiring a week after the month ends, so counters survive worker restarts.

Every clock reading is Redis' ``TIME``: workers on different hosts share one clock.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field

from producer.models import Action, ApiAction, BrowseAction, EmailAction, Primitive
from workers.guarantees.admission import Scripts

__all__ = [
    "ConcurrencyLimiter",
    "Lease",
    "LimitsPolicy",
    "QuotaCounter",
    "QuotaCounters",
    "QuotaPolicy",
    "Rate",
    "RateLimiter",
    "destination_hosts",
    "gcra_buckets",
    "month_reset",
    "quota_key",
]

PREFIX = "af"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rate(_Strict):
    """``per_second`` actions per second on average, with bursts of up to ``burst``."""

    per_second: float = Field(gt=0, le=100_000)
    burst: int = Field(1, ge=1, le=100_000)


class QuotaPolicy(_Strict):
    monthly: int | None = Field(None, ge=0, description="executed actions per month, all kinds")
    primitives: dict[Primitive, int] = Field(
        default_factory=dict, description="executed actions per month, per primitive"
    )


class LimitsPolicy(_Strict):
    """The ``limits`` section of a tenant's policy. Everything is unlimited when absent."""

    rate: dict[Primitive, Rate] = Field(default_factory=dict, description="per tenant x primitive")
    agent_rate: Rate | None = Field(None, description="per agent of the tenant, all primitives")
    host_rate: Rate | None = Field(
        None, description="per destination host (browse/api URL host, email recipient domain)"
    )
    # At least 1: a primitive a tenant must not run is left out of its ``primitives``.
    concurrency: dict[Primitive, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="running actions per tenant x primitive"
    )
    quota: QuotaPolicy = Field(default_factory=QuotaPolicy)


# --------------------------------------------------------------------------- keys


def destination_hosts(action: Action, cap: int = 16) -> list[str]:
    """The hosts an action talks to, for ``host_rate``.

    Email counts per recipient *domain*: receiving mail systems throttle per sending
    peer, and the relay is one host for every message (its limit is the relay's own).
    """
    if isinstance(action, BrowseAction | ApiAction):
        host = urlsplit(action.payload.url).hostname
        return [host.lower()] if host else []
    if isinstance(action, EmailAction):
        p = action.payload
        domains = {addr.rsplit("@", 1)[1].lower() for addr in [*p.to, *p.cc, *p.bcc]}
        return sorted(domains)[:cap]
    return []


def rate_keys(action: Action, limits: LimitsPolicy) -> list[tuple[str, Rate]]:
    t = action.tenant_id
    keys: list[tuple[str, Rate]] = []
    if (r := limits.rate.get(action.primitive)) is not None:
        keys.append((f"{PREFIX}:rate:t:{t}:{action.primitive}", r))
    if limits.agent_rate is not None:
        keys.append((f"{PREFIX}:rate:a:{t}:{action.agent_id}", limits.agent_rate))
    if limits.host_rate is not None:
        for host in destination_hosts(action):
            keys.append((f"{PREFIX}:rate:h:{t}:{host}", limits.host_rate))
    return keys


def _month(now: datetime) -> str:
    return f"{now.year:04d}-{now.month:02d}"


@functools.lru_cache(maxsize=4)  # per action otherwise; a month changes once a month
def _reset(year: int, month: int) -> datetime:
    days = calendar.monthrange(year, month)[1]
    end = datetime(year, month, days, tzinfo=UTC)
    return datetime.fromtimestamp(end.timestamp() + 86_400, UTC)


def month_reset(now: datetime) -> datetime:
    """Start of the next calendar month (UTC): when monthly quotas reset."""
    return _reset(now.year, now.month)


def quota_key(tenant: str, primitive: str | None, now: datetime) -> str:
    """Redis key of a monthly counter (``primitive=None``: all primitives)."""
    scope = primitive or "all"
    return f"{PREFIX}:quota:{tenant}:{scope}:{_month(now)}"


# --------------------------------------------------------------------------- rate


def gcra_buckets(buckets: Sequence[tuple[str, Rate]]) -> list[tuple[str, int, int]]:
    """(key, emission interval µs, burst tolerance µs) per bucket, for the ADMIT script."""
    out = []
    for key, rate in buckets:
        interval = 1_000_000 / rate.per_second
        out.append((key, round(interval), round(interval * (rate.burst - 1))))
    return out


class RateLimiter:
    """GCRA over any number of buckets at once, atomically (the ADMIT script's rate step).

    Each bucket key holds its theoretical arrival time (µs). With ``reserve`` an action
    over the limit books the slot at the wait in every bucket, even in the future, so the
    caller can schedule the action for exactly then.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = Scripts(client)

    def acquire(self, buckets: list[tuple[str, Rate]], *, reserve: bool) -> float:
        """Seconds to wait before the action may run (0: run now).

        ``reserve=True`` books the slot (the caller must run the action then);
        ``reserve=False`` takes a token only when one is available now.
        """
        if not buckets:
            return 0.0
        verdict = self._scripts.admit(rate=(gcra_buckets(buckets), reserve))
        return verdict.value / 1_000_000 if verdict.outcome == "rate" else 0.0


# --------------------------------------------------------------------------- concurrency


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    lease_id: str


class ConcurrencyLimiter:
    """Leases in a sorted set per tenant x primitive (the ADMIT script's lease step).

    Member = lease id, score = expiry in ms. Acquiring drops expired leases, then adds
    (or renews) this one when it is already held or the set has room.
    """

    def __init__(self, client: redis.Redis, lease_s: float) -> None:
        self.client = client
        self.ttl_ms = max(1, int(lease_s * 1000))
        self._scripts = Scripts(client)

    @staticmethod
    def key(tenant: str, primitive: str) -> str:
        return f"{PREFIX}:conc:{tenant}:{primitive}"

    def acquire(self, key: str, lease_id: str, limit: int) -> float:
        """0 when the lease is held; else seconds until the earliest lease expires."""
        verdict = self._scripts.admit(lease=(key, lease_id, limit, self.ttl_ms))
        return verdict.value / 1000 if verdict.outcome == "conc" else 0.0

    def renew(self, lease: Lease) -> bool:
        """Extend a lease that still exists (one that expired may be someone's slot now)."""
        return self._scripts.settle(lease=("n", lease.key, lease.lease_id, self.ttl_ms))[1]

    def release(self, lease: Lease) -> None:
        self._scripts.settle(lease=("x", lease.key, lease.lease_id, 0))

    def holders(self, key: str) -> list[str]:
        """Live leases (tests and operators read it)."""
        now_s, now_us = self.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        return [m.decode() for m in self.client.zrangebyscore(key, now_ms, "+inf")]


# --------------------------------------------------------------------------- quota


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    ok: bool
    scope: str = ""
    limit: int = 0
    used: int = 0
    resets_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QuotaCounters:
    """The counters one action counts against, and when they reset."""

    scoped: list[tuple[str, str, int]]  # (scope, key, limit)
    resets_at: datetime
    expire_at: int  # unix s: a week after the reset, for operators reading last month

    def verdict(self, index: int, used: int) -> QuotaVerdict:
        """The refusal for the full counter ``index`` (1-based, as ADMIT returns it)."""
        scope, _key, limit = self.scoped[index - 1]
        return QuotaVerdict(ok=False, scope=scope, limit=limit, used=used, resets_at=self.resets_at)


class QuotaCounter:
    """Monthly counters (the ADMIT script's quota step): one action counts once in every
    counter that applies to it, unless one of them is full."""

    # Counters outlive their month by a week, for operators reading last month's usage.
    KEEP_AFTER_RESET_S = 7 * 86_400

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = Scripts(client)

    @classmethod
    def counters(
        cls, action: Action, quota: QuotaPolicy, now: datetime | None = None
    ) -> QuotaCounters | None:
        """The action's counters this month (``now``: the clock), or None when no quota
        applies to it."""
        limit = quota.primitives.get(action.primitive)
        if quota.monthly is None and limit is None:
            return None
        now = now or datetime.now(UTC)
        month = _month(now)
        prefix = f"{PREFIX}:quota:{action.tenant_id}:"
        scoped: list[tuple[str, str, int]] = []
        if quota.monthly is not None:
            scoped.append(("all", f"{prefix}all:{month}", quota.monthly))
        if limit is not None:
            scoped.append((action.primitive, f"{prefix}{action.primitive}:{month}", limit))
        reset = month_reset(now)
        return QuotaCounters(scoped, reset, int(reset.timestamp()) + cls.KEEP_AFTER_RESET_S)

    def count(self, action: Action, quota: QuotaPolicy, now: datetime) -> QuotaVerdict:
        """Count one executed action against the tenant's quotas, unless one is full."""
        counters = self.counters(action, quota, now)
        if counters is None:
            return QuotaVerdict(ok=True)
        verdict = self._scripts.admit(
            quota=([(k, lim) for _, k, lim in counters.scoped], counters.expire_at)
        )
        if verdict.outcome == "quota":
            return counters.verdict(verdict.value, verdict.used)
        return QuotaVerdict(ok=True)
