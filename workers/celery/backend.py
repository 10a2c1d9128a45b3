"""Celery's Redis result backend, storing a result and the fleet's own settle writes in
ONE round trip.

Celery stores a result in two round trips (a GET, so a late duplicate cannot overwrite a
SUCCESS, then SETEX + PUBLISH in a transaction), and the pipeline then needs a third to
record the idempotency result and free the concurrency lease. Here the check-and-store is
one Lua script, atomic instead of racy, and whatever the pipeline asked to *ride along*
(``ride_with_result``) runs in the same script call (``_combined``: one EVALSHA, where a
MULTI/EXEC of one EVAL each cost the worker and Redis twice as much): the result is
visible to the agent if and only if the idempotency record says completed. For a trivial
action that is a third of the worker's Redis round trips (docs/reliability.md,
benchmarks/fleet_overhead.py).

Riders only make sense on the Redis that holds the results; the pipeline checks that
(``Reliability.defer_settle``) and otherwise writes them itself. Riders that no store
picked up (a task that ended without storing a result) are run on their own by the
``task_postrun`` hook in ``workers.app``, so they are never lost or carried over to the
next task.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from workers.celery.pinned_script import PinnedScript

__all__ = ["FleetRedisBackend", "Rider", "ride_with_result", "run_riders", "take_riders"]

log = logging.getLogger(__name__)

# KEYS[1]: the result key. ARGV: encoded meta, expiry in s (0: none). Like Celery's
# _store_result: never overwrite a SUCCESS (a late duplicate must not replace it).
_STORE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


_ORJSON_PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


@dataclass(frozen=True, slots=True)
class Rider:
    """A Lua script to run in the same script call as the next stored result."""

    script: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


_riders: ContextVar[tuple[Rider, ...]] = ContextVar("actionfleet_riders", default=())


def ride_with_result(rider: Rider) -> None:
    _riders.set((*_riders.get(), rider))


def take_riders() -> tuple[Rider, ...]:
    riders = _riders.get()
    if riders:
        _riders.set(())
    return riders


def run_riders(client: redis.Redis, riders: tuple[Rider, ...]) -> None:
    """Run riders on their own (no result was stored to carry them)."""
    if not riders:
        return
    with client.pipeline(transaction=True) as pipe:
        for r in riders:
            pipe.eval(r.script, len(r.keys), *r.keys, *r.args)
        _log_errors(riders, pipe.execute(raise_on_error=False))


def _log_errors(riders: tuple[Rider, ...], results: list[Any]) -> None:
    for rider, res in zip(riders, results, strict=False):
        if isinstance(res, Exception):
            log.error("settle write on %s failed: %s", rider.keys[:1], res)


def _combined(riders: tuple[Rider, ...]) -> str:
    """One script: ``_STORE``, then each rider, each body a function of its own slice of
    KEYS and ARGV. ARGV[1] holds each part's key and argument counts. Every part runs
    under pcall, as each command of a MULTI/EXEC would run whatever the others did.
    Returns the store's reply (1 stored, 0 kept a SUCCESS; else the error text), then ''
    or the error text of each rider."""
    parts = [_STORE, *(r.script for r in riders)]
    fns = "\n".join(f"local function p{i}(KEYS, ARGV)\n{body}\nend" for i, body in enumerate(parts))
    return f"""{fns}
local fns = {{{", ".join(f"p{i}" for i in range(len(parts)))}}}
local sizes = {{}}
for n in string.gmatch(ARGV[1], '%d+') do sizes[#sizes + 1] = tonumber(n) end
local k, a, out = 1, 2, {{}}
for i, fn in ipairs(fns) do
  local nk, na = sizes[2 * i - 1], sizes[2 * i]
  local ks, as = {{}}, {{}}
  for j = 1, nk do ks[j] = KEYS[k + j - 1] end
  for j = 1, na do as[j] = ARGV[a + j - 1] end
  k, a = k + nk, a + na
  local ok, res = pcall(fn, ks, as)
  if i == 1 then
    out[1] = ok and res or tostring(res)
  else
    out[i] = ok and '' or tostring(res)
  end
end
return out
"""


class FleetRedisBackend(RedisBackend):
    """``RedisBackend`` with an atomic check-and-store that carries the pipeline's riders."""

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        # Selected by class (workers.app), so Celery passes no URL: use the configured one.
        app = kwargs.get("app")
        if url is None and app is not None:
            url = app.conf.result_backend
        super().__init__(*args, url=url, **kwargs)
        # (rider scripts) -> the registered combined script; a handful of shapes at most.
        self._scripts: dict[tuple[str, ...], PinnedScript] = {}
        conf = self.app.conf
        self._lean_meta = not conf.result_extended and str(self.app.timezone) == "UTC"

    def _get_result_meta(
        self,
        result: Any,
        state: str,
        traceback: Any,
        request: Any,
        format_date: bool = True,
        encode: bool = False,
    ) -> dict[str, Any]:
        # Celery's, minus what costs ~25 us per result and changes nothing here: a config
        # lookup for result_extended (off) and a time zone round trip for date_done (UTC).
        # tests/workers/celery/test_backend.py checks this against Celery's own for every state.
        if not self._lean_meta or not format_date:
            return super()._get_result_meta(result, state, traceback, request, format_date, encode)
        meta = {
            "status": state,
            "result": result,
            "traceback": traceback,
            "children": self.current_task_children(request),
            "date_done": datetime.now(UTC).isoformat() if state in self.READY_STATES else None,
        }
        if request and getattr(request, "group", None):
            meta["group_id"] = request.group
        if request and getattr(request, "parent_id", None):
            meta["parent_id"] = request.parent_id
        return meta

    def _encode_meta(self, meta: dict[str, Any]) -> bytes | str:
        # orjson: ~10x cheaper than kombu's JSON for a result; anything it would write
        # differently from kombu (datetimes, dataclasses, subclasses) or cannot write
        # (ints past 64 bits) goes through kombu as before.
        if self.serializer == "json":
            with contextlib.suppress(TypeError):
                return orjson.dumps(meta, option=_ORJSON_PASSTHROUGH)
        return self.encode(meta)

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        riders = take_riders()
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self._encode_meta(meta)
        if len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)
        store = (key, value, int(expires or 0), riders)
        try:
            self._store_atomic(*store)
        except self.connection_errors:  # Celery's retry policy from here on
            self.ensure(self._store_atomic, store)
        return result

    def _script(self, riders: tuple[Rider, ...]) -> PinnedScript:
        shape = tuple(r.script for r in riders)
        script = self._scripts.get(shape)
        if script is None or script.client is not self.client:
            script = self._scripts[shape] = PinnedScript(self.client, _combined(riders))
        return script

    def _store_atomic(self, key: Any, value: Any, expires: int, riders: tuple[Rider, ...]) -> None:
        # One EVALSHA: the store and the riders, instead of MULTI, EVAL..., EXEC.
        sizes = [1, 2, *(n for r in riders for n in (len(r.keys), len(r.args)))]
        keys = [key, *(k for r in riders for k in r.keys)]
        args = [" ".join(map(str, sizes)), value, expires, *(a for r in riders for a in r.args)]
        try:
            results = self._script(riders)(keys=keys, args=args)
        except redis.ResponseError as exc:  # e.g. a full Redis refusing any script
            raise BackendStoreError(str(exc), state="", task_id=bytes_to_str(key)) from exc
        if not isinstance(results[0], int):
            raise BackendStoreError(bytes_to_str(results[0]), state="", task_id=bytes_to_str(key))
        for rider, err in zip(riders, results[1:], strict=False):
            if err:
                log.error("settle write on %s failed: %s", rider.keys[:1], bytes_to_str(err))
