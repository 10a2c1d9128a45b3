"""The two Lua scripts behind every limit and idempotency check: one round trip each.

``ADMIT`` runs, atomically and in this order, whichever sections the caller sends:

  0. nonce   -- a signed action's nonce (``workers.auth.verify``): recorded with the
                action id when new and fresh; refused when another action used it
                (replay), or when it is unknown and the signature is too old (stale).
  1. claim   -- the idempotency record: completed -> its stored result; held by another
                delivery -> busy (with the time left on its lease); else claim it.
  2. rate    -- GCRA over every bucket at once (see ``workers.guarantees.limits``); over the limit
                with ``reserve`` the next free slot is booked in every bucket.
  3. lease   -- a concurrency slot in the tenant x primitive lease set.
  4. quota   -- the monthly counters: one full counter refuses the action.

It checks every section before it writes anything, so a refusal leaves nothing behind:
no claim, no lease, no rate token, no count. The one exception is a rate deferral with
``reserve``: booking the slot is the point of it. The single-purpose methods
(``RateLimiter.acquire``, ``ConcurrencyLimiter.acquire``, ``QuotaCounter.count``,
``IdempotencyStore.claim``) send one section; the pipeline's guard sends them all.

``SETTLE`` does, in one round trip, what happens to a held record and lease: record the
result (only while this delivery still owns the claim, or nobody does), release the claim
or renew it; and remove the lease or renew it.

Every clock reading is Redis' ``TIME``, so workers on different hosts share one clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import redis

from workers.celery.pinned_script import PinnedScript

__all__ = ["ADMIT", "SETTLE", "Scripts", "Verdict", "settle_args"]

# How long ADMIT and SETTLE keep retrying a Redis that does not answer (a restart) before
# the action fails: about what the result store waits (workers/app.py, Celery's retries).
PATIENCE_S = 60.0

# KEYS: [claim] [rate buckets...] [lease set] [quota counters...] [nonce]
# ARGV[1]: how many keys each section has, "<claim 0|1> <rate n> <lease 0|1> <quota n>
# [<nonce 0|1>]" (one argument: every argument costs the client encoding work), then each
# present section's arguments in that order:
#   claim: owner, claim_ms          rate: reserve (0|1), then interval_us, tolerance_us
#   lease: limit, lease id, ttl_ms  quota: expire_at (unix s), then one limit per counter
#   nonce (last): action id, fresh (0|1), ttl_s
# Returns {'ok'} | {'done', result} | {'busy', ms} | {'rate', us} | {'conc', ms}
#       | {'quota', 1-based counter index, used} | {'replay'} | {'stale'}.
ADMIT = """
local n_claim, n_rate, n_lease, n_quota, n_nonce =
  string.match(ARGV[1], '^(%d) (%d+) (%d) (%d+) ?(%d?)$')
n_claim, n_rate, n_lease, n_quota = tonumber(n_claim), tonumber(n_rate), tonumber(n_lease),
  tonumber(n_quota)
if n_nonce == '1' then
  -- First: a replayed or stale message must not even see the idempotency record.
  local nonce, id, fresh = KEYS[#KEYS], ARGV[#ARGV - 2], ARGV[#ARGV - 1]
  local seen
  if fresh == '1' then
    seen = redis.call('SET', nonce, id, 'NX', 'GET', 'EX', ARGV[#ARGV])
  else
    seen = redis.call('GET', nonce)
  end
  if seen and seen ~= id then return {'replay'} end
  if (not seen) and fresh ~= '1' then return {'stale'} end
end
local a, k = 2, 1
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

local claim, owner, claim_ms, mine
if n_claim == 1 then
  claim, owner, claim_ms = KEYS[k], ARGV[a], ARGV[a + 1]
  k, a = k + 1, a + 2
  local v = redis.call('GET', claim)
  if v then
    local r = cjson.decode(v)
    if r.s == 'c' then return {'done', r.r} end
    if r.o ~= owner then return {'busy', redis.call('PTTL', claim)} end
    mine = true  -- re-claimed by its own holder
  end
end
-- A refusal frees a claim this delivery already held, like a release would.
local function refuse(reply)
  if mine then redis.call('DEL', claim) end
  return reply
end

local rate_k, rate_a, start, tats = k, a + 1, now_us, {}
if n_rate > 0 then
  local reserve = ARGV[a] == '1'
  k, a = k + n_rate, a + 1 + 2 * n_rate
  for i = 0, n_rate - 1 do
    local tat = tonumber(redis.call('GET', KEYS[rate_k + i]) or now_us)
    if tat < now_us then tat = now_us end
    tats[i] = tat
    local earliest = tat - tonumber(ARGV[rate_a + 2 * i + 1])
    if earliest > start then start = earliest end
  end
end
-- Take the token at ``start`` in every bucket (now, or the booked future slot).
local function take_rate()
  for i = 0, n_rate - 1 do
    local tat = tats[i]
    if tat < start then tat = start end
    local new = tat + tonumber(ARGV[rate_a + 2 * i])
    redis.call('SET', KEYS[rate_k + i], string.format('%d', new), 'PX',
               math.floor((new - now_us) / 1000) + 1000)
  end
end
if start > now_us then
  if ARGV[rate_a - 1] == '1' then take_rate() end
  return refuse({'rate', start - now_us})
end

local lease, lease_id, lease_ttl
if n_lease == 1 then
  lease, lease_id, lease_ttl = KEYS[k], ARGV[a + 1], tonumber(ARGV[a + 2])
  local limit = tonumber(ARGV[a])
  k, a = k + 1, a + 3
  redis.call('ZREMRANGEBYSCORE', lease, '-inf', now_ms)
  if not (redis.call('ZSCORE', lease, lease_id) or redis.call('ZCARD', lease) < limit) then
    local first = redis.call('ZRANGE', lease, 0, 0, 'WITHSCORES')
    local wait = lease_ttl  -- limit 0: nobody holds a slot to wait for
    if first[2] then wait = math.max(1, tonumber(first[2]) - now_ms) end
    return refuse({'conc', wait})
  end
end

local quota_k, quota_a = k, a + 1
if n_quota > 0 then
  for i = 0, n_quota - 1 do
    local used = tonumber(redis.call('GET', KEYS[quota_k + i]) or '0')
    if used >= tonumber(ARGV[quota_a + i]) then return refuse({'quota', i + 1, used}) end
  end
end

-- Admitted: now write every section.
if n_claim == 1 then
  redis.call('SET', claim, cjson.encode({s = 'p', o = owner}), 'PX', claim_ms)
end
take_rate()
if n_lease == 1 then
  redis.call('ZADD', lease, now_ms + lease_ttl, lease_id)
  redis.call('PEXPIRE', lease, lease_ttl * 2)
end
for i = 0, n_quota - 1 do
  redis.call('INCR', KEYS[quota_k + i])
  redis.call('EXPIREAT', KEYS[quota_k + i], ARGV[quota_a - 1])
end
return {'ok'}
"""

# KEYS: [claim] [lease set]
# ARGV: claim op ('' none | 'c' complete | 'r' release | 'n' renew), owner, result JSON
# ('c') or claim_ms ('n'), retention_s ('c'), lease op ('' or absent: none | 'x' remove |
# 'n' renew), lease id, ttl_ms ('n'). Returns {claim done 0|1, lease done 0|1}.
SETTLE = """
local k, claimed, leased = 1, 0, 0
local op, owner = ARGV[1], ARGV[2]
if op ~= '' then
  local key = KEYS[1]
  k = 2
  local v = redis.call('GET', key)
  local r = v and cjson.decode(v)
  if op == 'c' then
    -- Only while we still hold the claim (or nobody does): if ours lapsed and another
    -- delivery took over, that delivery's result is the one to keep.
    if not r or (r.s ~= 'c' and r.o == owner) then
      redis.call('SET', key, cjson.encode({s = 'c', o = owner, r = ARGV[3]}), 'EX', ARGV[4])
      claimed = 1
    end
  elseif r and r.s == 'p' and r.o == owner then
    if op == 'r' then redis.call('DEL', key) else redis.call('PEXPIRE', key, ARGV[3]) end
    claimed = 1
  end
end
if ARGV[5] == 'x' then
  leased = redis.call('ZREM', KEYS[k], ARGV[6])
elseif ARGV[5] == 'n' and redis.call('ZSCORE', KEYS[k], ARGV[6]) then
  -- Renew only a lease that still exists: one that expired may be someone's slot now.
  local t = redis.call('TIME')
  local ttl = tonumber(ARGV[7])
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[k], 'XX', now_ms + ttl, ARGV[6])
  redis.call('PEXPIRE', KEYS[k], ttl * 2)
  leased = 1
end
return {claimed, leased}
"""

Outcome = Literal["ok", "done", "busy", "rate", "conc", "quota", "replay", "stale"]
ClaimOp = Literal["", "c", "r", "n"]
LeaseOp = Literal["", "x", "n"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``ADMIT`` decided. ``value``: busy -> ms left on the holder's claim; rate ->
    µs to wait; conc -> ms to wait; quota -> 1-based index of the full counter."""

    outcome: Outcome
    value: int = 0
    used: int = 0  # quota: the full counter's value
    result: bytes | str = b""  # done: the stored result, JSON


_OK = Verdict("ok")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Scripts:
    """``ADMIT`` and ``SETTLE`` on one client (EVALSHA on a pinned connection, loaded on
    first miss: ``workers.celery.pinned_script``)."""

    def __init__(self, client: redis.Redis) -> None:
        # A Redis restart must not turn an action into a failure: wait it out, as the
        # result store does (Celery's backend retries), instead of failing the action.
        self._admit = PinnedScript(client, ADMIT, patience_s=PATIENCE_S)
        self._settle = PinnedScript(client, SETTLE, patience_s=PATIENCE_S)

    def admit(
        self,
        *,
        claim: tuple[str, str, int] | None = None,
        rate: tuple[Sequence[tuple[str, int, int]], bool] | None = None,
        lease: tuple[str, str, int, int] | None = None,
        quota: tuple[Sequence[tuple[str, int]], int] | None = None,
        nonce: tuple[str, str, bool, int] | None = None,
    ) -> Verdict:
        """``claim``: (key, owner, claim_ms); ``rate``: ([(key, interval_us, tolerance_us)],
        reserve); ``lease``: (key, lease id, limit, ttl_ms); ``quota``: ([(key, limit)],
        expire_at); ``nonce``: (key, action id, fresh, ttl_s). Absent or empty sections
        are skipped."""
        keys: list[str] = []
        args: list[int | str] = [""]  # the layout, below
        n_claim = n_rate = n_lease = n_quota = 0
        if claim is not None:
            keys.append(claim[0])
            n_claim = 1
            args += [claim[1], claim[2]]
        if rate is not None and rate[0]:
            n_rate = len(rate[0])
            args.append(1 if rate[1] else 0)
            for key, interval_us, tolerance_us in rate[0]:
                keys.append(key)
                args += [interval_us, tolerance_us]
        if lease is not None:
            keys.append(lease[0])
            n_lease = 1
            args += [lease[2], lease[1], lease[3]]
        if quota is not None and quota[0]:
            n_quota = len(quota[0])
            args.append(quota[1])
            for key, limit in quota[0]:
                keys.append(key)
                args.append(limit)
        args[0] = f"{n_claim} {n_rate} {n_lease} {n_quota}"
        if nonce is not None:
            keys.append(nonce[0])
            args += [nonce[1], 1 if nonce[2] else 0, nonce[3]]
            args[0] += " 1"
        reply = self._admit(keys=keys, args=args)
        outcome = _text(reply[0])
        if outcome == "ok":
            return _OK
        if outcome == "done":
            return Verdict("done", result=reply[1])
        if outcome in ("replay", "stale"):
            return Verdict(outcome)  # type: ignore[arg-type]
        return Verdict(
            outcome,  # type: ignore[arg-type]
            value=int(reply[1]),
            used=int(reply[2]) if len(reply) > 2 else 0,
        )

    def settle(
        self,
        *,
        claim: tuple[ClaimOp, str, str, int | str | bytes, int] | None = None,
        lease: tuple[LeaseOp, str, str, int] | None = None,
    ) -> tuple[bool, bool]:
        """``claim``: (op, key, owner, result JSON or claim_ms, retention_s); ``lease``:
        (op, key, lease id, ttl_ms). Returns (claim op done, lease op done)."""
        keys, args = settle_args(claim=claim, lease=lease)
        claimed, leased = self._settle(keys=keys, args=args)
        return bool(claimed), bool(leased)


def settle_args(
    *,
    claim: tuple[ClaimOp, str, str, int | str | bytes, int] | None = None,
    lease: tuple[LeaseOp, str, str, int] | None = None,
) -> tuple[list[str], list[int | str | bytes]]:
    """KEYS and ARGV of one ``SETTLE`` call (also for running it inside another
    transaction, e.g. next to a stored result)."""
    keys: list[str] = []
    args: list[int | str | bytes]
    if claim is not None:
        keys.append(claim[1])
        args = [claim[0], claim[2], claim[3], claim[4]]
    else:
        args = ["", "", "", 0]
    if lease is not None:  # absent lease arguments mean no lease op
        keys.append(lease[1])
        args += [lease[0], lease[2], lease[3]]
    return keys, args
