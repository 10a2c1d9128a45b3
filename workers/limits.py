"""Fleet-wide rate limits, concurrency leases and monthly quotas, kept in Redis.

Celery's own ``rate_limit`` is per worker instance (ten workers, ten times the limit) and
parks rate-limited tasks in the worker's prefetch buffer. These limits live in Redis and
every check is one atomic Lua script, so they hold across any number of workers.

- Rate: GCRA (generic cell rate algorithm), one key per bucket holding its theoretical
  arrival time. An action over its limit *books* the next free slot of every bucket it
  touches (``reserve``) and is re-queued to run at that slot, so deferred actions never
  stampede back and the observed rate stays on the configured one.
- Concurrency: a sorted set of leases (member = lease id, score = expiry in ms). A lease
  is renewed while its action runs (see ``workers.leasekeeper``); a dead worker stops
  renewing and its slot returns after ``lease_s``.
- Quota: a counter per tenant (and per tenant x primitive) per calendar month (UTC),
  expiring a week after the month ends, so counters survive worker restarts.

Every clock reading is Redis' ``TIME``: workers on different hosts share one clock.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field

from producer.models import Action, ApiAction, BrowseAction, EmailAction, Primitive

__all__ = [
    "ConcurrencyLimiter",
    "LimitsPolicy",
    "QuotaCounter",
    "QuotaPolicy",
    "Rate",
    "RateLimiter",
    "destination_hosts",
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
    concurrency: dict[Primitive, int] = Field(
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
    return now.strftime("%Y-%m")


def month_reset(now: datetime) -> datetime:
    """Start of the next calendar month (UTC): when monthly quotas reset."""
    days = calendar.monthrange(now.year, now.month)[1]
    end = now.replace(day=days, hour=0, minute=0, second=0, microsecond=0)
    return datetime.fromtimestamp(end.timestamp() + 86_400, UTC)


def quota_key(tenant: str, primitive: str | None, now: datetime) -> str:
    """Redis key of a monthly counter (``primitive=None``: all primitives)."""
    scope = primitive or "all"
    return f"{PREFIX}:quota:{tenant}:{scope}:{_month(now)}"


# --------------------------------------------------------------------------- rate

# KEYS: bucket keys. ARGV: reserve (0/1), then per key: interval_us, tolerance_us.
# Returns the wait in microseconds until every bucket allows one more action (0: now).
# With reserve=1 the slot at that time is booked in every bucket even when it is in
# the future, so the caller can schedule the action for exactly then.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local reserve = ARGV[1] == '1'
local start = now
local tats = {}
for i = 1, #KEYS do
  local tol = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tats[i] = tat
  if tat - tol > start then start = tat - tol end
end
local wait = start - now
if wait > 0 and not reserve then return wait end
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local tat = tats[i]
  if tat < start then tat = start end
  local new = tat + interval
  redis.call('SET', KEYS[i], string.format('%d', new), 'PX',
             math.floor((new - now) / 1000) + 1000)
end
return wait
"""


class RateLimiter:
    """GCRA over any number of buckets at once, atomically."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_GCRA)

    def acquire(self, buckets: list[tuple[str, Rate]], *, reserve: bool) -> float:
        """Seconds to wait before the action may run (0: run now).

        ``reserve=True`` books the slot (the caller must run the action then);
        ``reserve=False`` takes a token only when one is available now.
        """
        if not buckets:
            return 0.0
        argv: list[str] = ["1" if reserve else "0"]
        for _key, rate in buckets:
            interval = 1_000_000 / rate.per_second
            argv += [f"{interval:.0f}", f"{interval * (rate.burst - 1):.0f}"]
        wait_us = int(self._script(keys=[k for k, _ in buckets], args=argv))
        return max(0.0, wait_us / 1_000_000)


# --------------------------------------------------------------------------- concurrency

# KEYS[1]: lease set. ARGV: limit, lease id, ttl_ms. Returns 0 when the lease is held
# (new or renewed), else the ms until the earliest lease expires.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 0
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(first[2]) - now)
"""

# Renew only a lease that still exists: one that expired may already be someone's slot.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    lease_id: str


class ConcurrencyLimiter:
    def __init__(self, client: redis.Redis, lease_s: float) -> None:
        self.client = client
        self.ttl_ms = max(1, int(lease_s * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)

    @staticmethod
    def key(tenant: str, primitive: str) -> str:
        return f"{PREFIX}:conc:{tenant}:{primitive}"

    def acquire(self, key: str, lease_id: str, limit: int) -> float:
        """0 when the lease is held; else seconds until the earliest lease expires."""
        wait_ms = int(self._acquire(keys=[key], args=[limit, lease_id, self.ttl_ms]))
        return wait_ms / 1000

    def renew(self, lease: Lease) -> bool:
        return bool(self._renew(keys=[lease.key], args=[lease.lease_id, self.ttl_ms]))

    def release(self, lease: Lease) -> None:
        self.client.zrem(lease.key, lease.lease_id)

    def holders(self, key: str) -> list[str]:
        """Live leases (tests and operators read it)."""
        now_s, now_us = self.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        return [m.decode() for m in self.client.zrangebyscore(key, now_ms, "+inf")]


# --------------------------------------------------------------------------- quota

# KEYS: counters. ARGV: expire_at (unix s), then one limit per key. Counts one action in
# every counter when none is at its limit; else returns the 1-based index of the full one.
_QUOTA = """
for i = 1, #KEYS do
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used >= tonumber(ARGV[i + 1]) then return {i, used} end
end
for i = 1, #KEYS do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIREAT', KEYS[i], ARGV[1])
end
return {0, 0}
"""

QuotaScope = Literal["all", "primitive"]


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    ok: bool
    scope: str = ""
    limit: int = 0
    used: int = 0
    resets_at: datetime | None = None


class QuotaCounter:
    # Counters outlive their month by a week, for operators reading last month's usage.
    KEEP_AFTER_RESET_S = 7 * 86_400

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_QUOTA)

    def count(self, action: Action, quota: QuotaPolicy, now: datetime) -> QuotaVerdict:
        """Count one executed action against the tenant's quotas, unless one is full."""
        scoped: list[tuple[str, str, int]] = []
        if quota.monthly is not None:
            scoped.append(("all", quota_key(action.tenant_id, None, now), quota.monthly))
        if (limit := quota.primitives.get(action.primitive)) is not None:
            key = quota_key(action.tenant_id, action.primitive, now)
            scoped.append((action.primitive, key, limit))
        if not scoped:
            return QuotaVerdict(ok=True)
        reset = month_reset(now)
        expire_at = int(reset.timestamp()) + self.KEEP_AFTER_RESET_S
        index, used = self._script(
            keys=[k for _, k, _ in scoped], args=[expire_at, *[lim for _, _, lim in scoped]]
        )
        if int(index) == 0:
            return QuotaVerdict(ok=True)
        scope, _key, limit = scoped[int(index) - 1]
        return QuotaVerdict(ok=False, scope=scope, limit=limit, used=int(used), resets_at=reset)
