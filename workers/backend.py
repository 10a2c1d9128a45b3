"""Celery's Redis result backend, storing a result and the fleet's own settle writes in
ONE round trip.

Celery stores a result in two round trips (a GET, so a late duplicate cannot overwrite a
SUCCESS, then SETEX + PUBLISH in a transaction), and the pipeline then needs a third to
record the idempotency result and free the concurrency lease. Here the check-and-store is
one Lua script, atomic instead of racy, and whatever the pipeline asked to *ride along*
(``ride_with_result``) runs in the same MULTI/EXEC: the result is visible to the agent if
and only if the idempotency record says completed. For a trivial action that is a third
of the worker's Redis round trips (docs/reliability.md, benchmarks/fleet_overhead.py).

Riders only make sense on the Redis that holds the results; the pipeline checks that
(``Reliability.defer_settle``) and otherwise writes them itself. Riders that no store
picked up (a task that ended without storing a result) are run on their own by the
``task_postrun`` hook in ``workers.app``, so they are never lost or carried over to the
next task.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

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


@dataclass(frozen=True, slots=True)
class Rider:
    """A Lua script to run in the same transaction as the next stored result."""

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


class FleetRedisBackend(RedisBackend):
    """``RedisBackend`` with an atomic check-and-store that carries the pipeline's riders."""

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        # Selected by class (workers.app), so Celery passes no URL: use the configured one.
        app = kwargs.get("app")
        if url is None and app is not None:
            url = app.conf.result_backend
        super().__init__(*args, url=url, **kwargs)

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
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key = self.get_key_for_task(task_id)
        self.ensure(self._store_atomic, (key, value, int(expires or 0), riders))
        return result

    def _store_atomic(self, key: Any, value: Any, expires: int, riders: tuple[Rider, ...]) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.eval(_STORE, 1, key, value, expires)
            for r in riders:
                pipe.eval(r.script, len(r.keys), *r.keys, *r.args)
            results = pipe.execute(raise_on_error=False)
        if isinstance(results[0], redis.ConnectionError | redis.TimeoutError):
            raise results[0]  # retried by ensure()
        if isinstance(results[0], Exception):
            raise BackendStoreError(str(results[0]), state="", task_id=bytes_to_str(key))
        _log_errors(riders, results[1:])
