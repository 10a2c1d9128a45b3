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
  retry (``retries``); the error is raised after that;
- NOSCRIPT (a restarted Redis, SCRIPT FLUSH) loads the script and sends it again;
- a fork or a replaced connection pool gets a connection of its own.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import redis

__all__ = ["PinnedScript"]


class PinnedScript:
    def __init__(self, client: redis.Redis, script: str, *, retries: int = 1) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.retries = retries
        self._local = threading.local()

    def _connection(self) -> Any:
        local = self._local
        pool = self.client.connection_pool
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid() or local.pool is not pool:
            conn = pool.get_connection()  # kept: this thread's, for the process's life
            local.conn, local.pid, local.pool = conn, os.getpid(), pool
        return conn

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        conn = self._connection()
        packed = conn.pack_command("EVALSHA", self.sha, len(keys), *keys, *args)
        failures = 0
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
                    raise
            except BaseException:
                conn.disconnect()  # a reply may be on its way: never read it as ours
                raise
