"""A Lua script called on a connection of its own: redis-py's command path without its
per-call overhead, for the three script calls every action makes (ADMIT, the result
store, the ack).

redis-py's ``Redis.execute_command`` spends ~50 µs of CPU per call on top of the socket
I/O itself (~35 µs) here: a pool checkout that probes the socket for stray data (a
handful of syscalls), the retry wrapper, observability hooks. ``PinnedScript`` keeps one
connection per process and thread, taken from the client's pool and never given back,
and sends EVALSHA straight on it (benchmarks/README.md has the measurement).

What the checkout protected against is handled here instead:
- a reply left unread (an exception between send and read: a timeout, a signal such as
  Celery's soft time limit) closes the connection, so no later call reads a stale reply;
- a dropped connection is reopened and the call sent once more, like redis-py's default
  retry (``retries``); with ``patience_s`` it keeps trying, backing off up to 2 s, for
  that long (a Redis restart), and raises after that;
- NOSCRIPT (a restarted Redis, SCRIPT FLUSH) loads the script and sends it again;
- a fork or a replaced connection pool gets a connection of its own;
- at most ``max_pinned`` threads per process pin one; others take redis-py's path.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

__all__ = ["PinnedScript"]


class PinnedScript:
    # Threads pinned per process and connection pool; more (a pool of short-lived
    # threads, greenlets) go through redis-py's own path instead of keeping a
    # connection each for good.
    max_pinned = 16

    def __init__(
        self, client: redis.Redis, script: str, *, retries: int = 1, patience_s: float = 0.0
    ) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.retries = retries
        self.patience_s = patience_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pinned: dict[tuple[int, int], int] = {}  # (pid, id(pool)) -> threads pinned

    def _connection(self) -> Any | None:
        local = self._local
        pool = self.client.connection_pool
        conn = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is not None and local.pid == pid and local.pool is pool:
            return conn
        with self._lock:
            key = (pid, id(pool))
            if self._pinned.get(key, 0) >= self.max_pinned:
                return None
            self._pinned[key] = self._pinned.get(key, 0) + 1
        conn = pool.get_connection()  # kept: this thread's, for the process's life
        local.conn, local.pid, local.pool = conn, pid, pool
        return conn

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        conn = self._connection()
        if conn is None:
            return self._unpinned(keys, args)
        packed = conn.pack_command("EVALSHA", self.sha, len(keys), *keys, *args)
        failures, give_up = 0, 0.0
        while True:
            try:
                conn.send_packed_command(packed)
                return conn.read_response()
            except redis.exceptions.NoScriptError:  # the reply was read: the line is clean
                self.client.script_load(self.script)
            except redis.ResponseError:
                raise
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()  # reopened by the next send
                failures += 1
                if failures > self.retries:
                    give_up = give_up or time.monotonic() + self.patience_s
                    if time.monotonic() >= give_up:
                        raise
                    time.sleep(min(2.0, 0.05 * 2 ** (failures - self.retries)))
            except BaseException:
                conn.disconnect()  # a reply may be on its way: never read it as ours
                raise

    def _unpinned(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.client.script_load(self.script)
            return self.client.evalsha(self.sha, len(keys), *keys, *args)
