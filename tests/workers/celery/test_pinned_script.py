"""``workers.celery.pinned_script.PinnedScript`` on a real redis-server: one connection per
process and thread for every call, and what redis-py's pool checkout protected against
still handled -- a restarted Redis without the script, a dropped connection, a reply
left unread by an exception, a fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, start_redis
from workers.celery.pinned_script import PinnedScript
from workers.ops.fleet import free_port

DB = 13
ECHO = "return ARGV[1]"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client(DB)
    yield c
    c.close()


def _connections(client: redis.Redis) -> set[int]:
    """Ids of this database's connections, as redis-server lists them."""
    return {int(c["id"]) for c in client.client_list() if int(c.get("db", -1)) == DB}


def test_every_call_goes_on_one_connection(client: redis.Redis) -> None:
    echo = PinnedScript(client, ECHO)
    assert echo(args=["a"]) == b"a"
    opened = _connections(client)
    for i in range(20):
        assert echo(args=[str(i)]) == str(i).encode()
    assert _connections(client) == opened  # nothing new opened, nothing checked out
    assert client.connection_pool._in_use_connections  # ours, kept


def test_a_flushed_script_is_loaded_again(client: redis.Redis) -> None:
    echo = PinnedScript(client, ECHO)
    assert echo(args=["before"]) == b"before"
    client.script_flush()  # what a Redis restart does to loaded scripts
    assert echo(args=["after"]) == b"after"


def test_a_killed_connection_is_reopened(client: redis.Redis) -> None:
    echo = PinnedScript(client, ECHO)
    assert echo(args=["x"]) == b"x"
    # The kill goes out on another of the pool's connections, never the pinned one.
    assert client.client_kill_filter(_id=_client_id(client, echo._local.conn)) == 1
    assert echo(args=["y"]) == b"y"


def test_an_unreachable_redis_raises_after_the_retry() -> None:
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        PinnedScript(client, ECHO)(args=["x"])


def test_a_reply_left_unread_is_never_read_as_the_next_one(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    echo = PinnedScript(client, ECHO)
    assert echo(args=["warm"]) == b"warm"
    conn = echo._local.conn

    class Interrupted(Exception):  # e.g. Celery's soft time limit, raised by a signal
        pass

    def interrupted(*_: Any, **__: Any) -> Any:
        raise Interrupted()

    monkeypatch.setattr(conn, "read_response", interrupted)
    with pytest.raises(Interrupted):
        echo(args=["first"])  # sent; its reply stays in the socket
    monkeypatch.undo()
    assert echo(args=["second"]) == b"second"  # not b"first"


def test_a_script_error_raises_and_the_connection_stays(client: redis.Redis) -> None:
    broken = PinnedScript(client, "return redis.call('NOSUCHCOMMAND')")
    echo = PinnedScript(client, ECHO)
    with pytest.raises(redis.ResponseError):
        broken()
    assert echo(args=["ok"]) == b"ok"
    conn = broken._local.conn
    with pytest.raises(redis.ResponseError):
        broken()
    assert broken._local.conn is conn and conn._sock is not None


def test_threads_and_forked_children_get_their_own_connection(client: redis.Redis) -> None:
    echo = PinnedScript(client, ECHO)
    assert echo(args=["main"]) == b"main"
    conns: list[Any] = []

    def other() -> None:
        assert echo(args=["thread"]) == b"thread"
        conns.append(echo._local.conn)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert conns and conns[0] is not echo._local.conn

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own connection, never the parent's socket
        try:
            ok = echo(args=["child"]) == b"child" and echo._local.pid == os.getpid()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert echo(args=["parent"]) == b"parent"  # the parent's line is untouched


def test_threads_past_the_cap_go_through_redis_py(client: redis.Redis) -> None:
    # A pool of short-lived threads must not keep a connection each for good.
    echo = PinnedScript(client, ECHO)
    echo.max_pinned = 2
    client.script_flush()  # the unpinned path loads the script too
    results: list[bytes] = []

    def call(i: int) -> None:
        results.append(echo(args=[f"t{i}"]))

    for i in range(6):
        t = threading.Thread(target=call, args=(i,))
        t.start()
        t.join()
    assert sorted(results) == [f"t{i}".encode() for i in range(6)]
    assert sum(echo._pinned.values()) == 2
    assert len(client.connection_pool._in_use_connections) == 2  # the pinned ones only


def _client_id(client: redis.Redis, conn: Any) -> int:
    port = conn._sock.getsockname()[1]
    for c in client.client_list():
        if c["addr"].endswith(f":{port}"):
            return int(c["id"])
    raise AssertionError("the pinned connection is not listed")


def test_with_patience_a_restarting_redis_is_waited_for(tmp_path: Path) -> None:
    # ADMIT and SETTLE wait out a Redis restart instead of failing the action.
    server = start_redis(tmp_path / "redis")
    c = server.client(DB)
    echo = PinnedScript(c, ECHO, patience_s=30)
    assert echo(args=["before"]) == b"before"
    server.proc.terminate()
    server.proc.wait(10)
    with pytest.raises(redis.ConnectionError):  # without patience it is an error at once
        PinnedScript(c, ECHO)(args=["x"])
    restarted: list[RedisServer] = []
    starter = threading.Timer(
        1.0, lambda: restarted.append(start_redis(tmp_path / "redis", port=server.port))
    )
    starter.start()
    try:
        assert echo(args=["after"]) == b"after"  # sent again once the new server answers
    finally:
        starter.join()
        for s in restarted:
            s.proc.terminate()
            s.proc.wait(10)
        c.close()
