"""The workers' Redis transport (workers/celery/broker.py) on a real redis-server: a fetched
message is in kombu's ``unacked`` record before the worker has read it, so a worker
killed with the reply in flight loses nothing; priorities, the idle BRPOP path and a
Redis that lost its scripts still work."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from producer.transport import REDIS_PRIORITY_STEPS, redis_queue_keys
from tests.conftest import RedisServer

DB = 15
QUEUE = "actions.test"
OPTIONS = {
    "visibility_timeout": 1,
    "priority_steps": REDIS_PRIORITY_STEPS,
    "queue_order_strategy": "priority",
}


@pytest.fixture
def url(redis_server: RedisServer) -> Iterator[str]:
    redis_server.client(DB).flushdb()
    yield redis_server.url(DB)
    redis_server.client(DB).flushdb()


def _publish(url: str, *bodies: dict[str, Any], priority: int = 0) -> None:
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    with Connection(url, transport_options=OPTIONS) as conn:  # kombu's stock transport
        producer = Producer(conn.default_channel)
        for body in bodies:
            producer.publish(
                body, exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
                serializer="json", priority=priority,
            )  # fmt: skip


def _connect(
    url: str, transport: str | None = "workers.celery.broker:Transport", **options: Any
) -> Connection:
    return Connection(url, transport=transport, transport_options=OPTIONS | options)


def _consume(conn: Connection, received: list[Any]) -> Any:
    channel = conn.channel()
    channel.basic_consume(
        QUEUE, no_ack=False, callback=received.append, consumer_tag="test"
    )  # fmt: skip
    return channel


def _queued(client: redis.Redis) -> list[bytes]:
    return [m for k in redis_queue_keys(QUEUE) for m in client.lrange(k, 0, -1)]


def _start_fetch_and_die(url: str, transport: str | None) -> None:
    # A worker that asked for a message and was SIGKILLed before reading the reply:
    # the request reaches Redis, the socket then closes unread.
    conn = _connect(url, transport)
    channel = _consume(conn, [])
    channel.client.connection = channel.client.connection_pool.get_connection()
    channel._brpop_start()
    deadline = time.monotonic() + 5
    sock = channel.client.connection._sock
    while time.monotonic() < deadline and not _readable(sock):
        time.sleep(0.01)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_message_in_flight_to_a_killed_worker_is_restored(
    url: str, redis_server: RedisServer
) -> None:
    client = redis_server.client(DB)
    _publish(url, {"n": 1})
    _start_fetch_and_die(url, "workers.celery.broker:Transport")
    # Out of the queue, but recorded as delivered-and-unacknowledged ...
    assert _queued(client) == []
    ((tag, raw),) = client.hgetall("unacked").items()
    message, exchange, routing_key = json.loads(raw)
    assert message["properties"]["delivery_tag"] == tag.decode()
    assert (exchange, routing_key) == (QUEUE, QUEUE)
    assert client.zscore("unacked_index", tag) is not None
    # ... so the visibility timeout sweep of another worker puts it back, once.
    time.sleep(1.2)
    with _connect(url) as other:
        other.default_channel.qos.restore_visible(num=10, interval=1)
    restored = _queued(client)
    assert len(restored) == 1 and client.hlen("unacked") == 0
    assert json.loads(restored[0])["headers"]["redelivered"] is True


def test_stock_kombu_loses_that_message(url: str, redis_server: RedisServer) -> None:
    # Why workers/celery/broker.py exists: with kombu's BRPOP the same crash leaves nothing to
    # restore. (If this starts failing, kombu closed the window; the module can go.)
    client = redis_server.client(DB)
    _publish(url, {"n": 1})
    _start_fetch_and_die(url, "kombu.transport.redis:Transport")
    assert _queued(client) == [] and client.hlen("unacked") == 0


def _drain(conn: Connection, received: list[Any], n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < n and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)


def _evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def test_priorities_acks_and_the_idle_wait(url: str, redis_server: RedisServer) -> None:
    client = redis_server.client(DB)
    _publish(url, {"n": "low"}, priority=9)  # kombu serves the lowest number first
    _publish(url, {"n": "high"}, priority=0)
    received: list[Any] = []
    with _connect(url) as conn:
        _consume(conn, received)
        before = _evalsha_calls(client)
        _drain(conn, received, 2)
        assert [m.decode()["n"] for m in received] == ["high", "low"]
        assert _evalsha_calls(client) - before >= 2  # both fetched by the script
        assert client.hlen("unacked") == 2
        for m in received:
            m.ack()
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        # Empty queues: the fetch finds nothing and the worker waits with BRPOP; the
        # message it gets that way is recorded by kombu's own second step.
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)
        _publish(url, {"n": "after idle"})
        _drain(conn, received, 3)
        assert received[2].decode()["n"] == "after idle"
        assert client.hlen("unacked") == 1
        received[2].ack()
        # With a message waiting, the next fetch is the script again.
        _publish(url, {"n": "busy"})
        calls = _evalsha_calls(client)
        _drain(conn, received, 4)
        assert received[3].decode()["n"] == "busy" and _evalsha_calls(client) > calls
        received[3].ack()
    assert client.hlen("unacked") == 0 and _queued(client) == []


def test_a_restarted_redis_without_the_script(url: str, redis_server: RedisServer) -> None:
    client = redis_server.client(DB)
    received: list[Any] = []
    with _connect(url) as conn:
        _consume(conn, received)
        _publish(url, {"n": 1})
        _drain(conn, received, 1)
        received[0].ack()
        client.script_flush()  # what a restart does to loaded scripts
        _publish(url, {"n": 2}, {"n": 3})
        _drain(conn, received, 3)
        assert [m.decode()["n"] for m in received] == [1, 2, 3]
        for m in received[1:]:
            m.ack()
    assert client.hlen("unacked") == 0 and _queued(client) == []


def _calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_an_ack_is_one_script_call_on_one_client(url: str, redis_server: RedisServer) -> None:
    client = redis_server.client(DB)
    _publish(url, {"n": 1}, {"n": 2}, {"n": 3})
    received: list[Any] = []
    with _connect(url) as conn:
        channel = _consume(conn, received)
        _drain(conn, received, 3)
        assert client.hlen("unacked") == 3
        multi, evalsha = _calls(client, "multi"), _calls(client, "evalsha")
        for m in received:
            m.ack()
        # kombu's ack is MULTI, ZREM, HDEL, EXEC; here it is one EVALSHA per message.
        assert _calls(client, "multi") == multi
        assert _calls(client, "evalsha") == evalsha + 3
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        # kombu built a redis.Redis per ack; here one per connection pool, and a new
        # one once the pool is replaced (after a connection error).
        first = channel._create_client()
        assert channel._create_client() is first
        channel._disconnect_pools()
        second = channel._create_client()
        assert second is not first and second.connection_pool is channel.pool
    assert _queued(client) == []


def _looped(url: str, callback: Any) -> tuple[Connection, Any, Any]:
    """A consumer driven by kombu's event loop, as in a Celery worker (prefetch 1):
    (connection, loop, channel), consuming ``QUEUE`` into ``callback``."""
    from kombu.asynchronous import Hub

    hub = Hub()
    conn = _connect(url)
    conn.transport.register_with_event_loop(conn.connection, hub)
    channel = conn.channel()
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(QUEUE, no_ack=False, callback=callback, consumer_tag="t")
    return conn, hub, channel


def _turns(hub: Any, until: Any, limit: int = 200) -> None:
    for _ in range(limit):
        if until():
            return
        hub.call_later(0.01, lambda: None)  # bound the loop's wait for a reply
        hub.run_once()
    raise AssertionError("the loop did not get there")


def test_in_a_loop_an_ack_rides_with_the_next_fetch(url: str, redis_server: RedisServer) -> None:
    client = redis_server.client(DB)
    n = 6
    _publish(url, *({"n": i} for i in range(n)))
    received: list[Any] = []

    def on_message(message: Any) -> None:
        received.append(message.decode()["n"])
        message.ack()  # as Celery does when the task returns

    conn, hub, _ = _looped(url, on_message)
    try:
        before = _evalsha_calls(client)
        _turns(hub, lambda: len(received) == n and client.hlen("unacked") == 0)
        assert received == list(range(n))
        # n fetches plus the one that found the queue empty, and no ACK call: each ack
        # was applied by the fetch that followed it (before, 2 script calls per message).
        assert _evalsha_calls(client) - before <= n + 1
        assert client.zcard("unacked_index") == 0 and _queued(client) == []
    finally:
        conn.close()


def test_an_ack_no_fetch_carries_is_sent_before_the_loop_waits(
    url: str, redis_server: RedisServer
) -> None:
    client = redis_server.client(DB)
    _publish(url, {"n": 1}, {"n": 2})
    received: list[Any] = []
    conn, hub, channel = _looped(url, received.append)
    try:
        _turns(hub, lambda: len(received) == 1)
        # The consumer is cancelled (a worker told to stop consuming): no fetch follows.
        channel.basic_cancel("t")
        received[0].ack()
        assert client.hlen("unacked") == 1  # still pending in the worker ...
        hub.run_once()  # ... until the loop's next turn, before it waits
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        assert len(_queued(client)) == 1  # the other message was never fetched
    finally:
        conn.close()


def test_acks_pending_at_close_are_sent(url: str, redis_server: RedisServer) -> None:
    client = redis_server.client(DB)
    _publish(url, {"n": 1})
    received: list[Any] = []
    conn, hub, _ = _looped(url, received.append)
    _turns(hub, lambda: len(received) == 1)
    received[0].ack()
    assert client.hlen("unacked") == 1
    conn.close()  # warm shutdown: no further turn of the loop
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_an_ack_after_the_channel_closed_is_sent_at_once(
    url: str, redis_server: RedisServer
) -> None:
    # The connection was lost while the task ran: Celery acks on the old, closed channel
    # when the task returns. No loop turn will carry that ack, so it goes out at once.
    client = redis_server.client(DB)
    _publish(url, {"n": 1})
    received: list[Any] = []
    conn, hub, channel = _looped(url, received.append)
    _turns(hub, lambda: len(received) == 1)
    channel.qos.restore_at_shutdown = False  # the task is running: not put back
    conn.close()
    assert client.hlen("unacked") == 1
    received[0].ack()
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


class _FetchReplyLoss:
    """A loopback TCP proxy in front of redis-server that loses one FETCH's reply, as a
    Redis shut down right after running it does: ``arm("ran")`` forwards the next FETCH,
    waits for Redis's reply and closes the client's connection instead of passing it
    on; ``arm("unsent")`` closes it without forwarding the FETCH at all."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode: str | None = None
        self.lost = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str) -> None:
        self.mode = mode
        self.lost.clear()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()

    def _pump(self, down: socket.socket, up: socket.socket) -> None:
        from workers.celery.broker import _FETCH_SHA

        with down, up:
            while True:
                ready, _, _ = select.select([down, up], [], [])
                if up in ready:
                    data = up.recv(65536)
                    if not data:
                        return
                    down.sendall(data)
                if down in ready:
                    data = down.recv(65536)
                    if not data:
                        return
                    if self.mode and _FETCH_SHA.encode() in data:
                        if self.mode == "ran":
                            up.sendall(data)
                            up.recv(65536)  # Redis ran it and replied; the reply is lost
                        self.mode = None
                        self.lost.set()
                        down.shutdown(socket.SHUT_RDWR)
                        return
                    up.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def lossy(url: str, redis_server: RedisServer) -> Iterator[tuple[str, _FetchReplyLoss]]:
    proxy = _FetchReplyLoss(redis_server.port)
    # A visibility timeout far beyond the test: only the fix can bring the message back.
    yield f"redis://127.0.0.1:{proxy.port}/{DB}", proxy
    proxy.close()


def _consumer_through(url: str, received: list[Any]) -> Connection:
    conn = _connect(url, visibility_timeout=3600)
    _consume(conn, received)
    return conn


def _lose_a_fetch(conn: Connection, proxy: _FetchReplyLoss, mode: str) -> None:
    proxy.arm(mode)
    with pytest.raises(conn.connection_errors):
        for _ in range(20):
            conn.drain_events(timeout=0.5)
    assert proxy.lost.is_set()


def test_a_message_whose_fetch_reply_was_lost_goes_back_at_the_next_fetch(
    lossy: tuple[str, _FetchReplyLoss], redis_server: RedisServer
) -> None:
    from workers.celery import broker

    proxy_url, proxy = lossy
    client = redis_server.client(DB)
    _publish(redis_server.url(DB), {"n": 1})
    lost: list[Any] = []
    first = _consumer_through(proxy_url, lost)
    _lose_a_fetch(first, proxy, "ran")
    # The fetch ran: out of the queue, recorded as unacked, and delivered to nobody.
    assert lost == [] and _queued(client) == [] and client.hlen("unacked") == 1
    # The worker reconnects (a new connection, as Celery's consumer makes one) and gets
    # it at once, marked redelivered, instead of after the visibility timeout.
    received: list[Any] = []
    second = _consumer_through(proxy_url, received)
    try:
        _drain(second, received, 1)
        assert [m.decode() for m in received] == [{"n": 1}]
        assert received[0].delivery_info["redelivered"] is True
        assert client.hlen("unacked") == 1  # its own delivery now, acked as usual
        received[0].ack()
        assert client.hlen("unacked") == 0 and not broker._lost_fetches
    finally:
        second.close()
        first.release()


def test_a_lost_fetch_that_never_ran_puts_back_nothing(
    lossy: tuple[str, _FetchReplyLoss], redis_server: RedisServer
) -> None:
    # The marker then still names the channel's previous message, which its task is
    # running: that one must stay where it is.
    from workers.celery import broker

    proxy_url, proxy = lossy
    client = redis_server.client(DB)
    _publish(redis_server.url(DB), {"n": 1}, {"n": 2})
    running: list[Any] = []
    first = _consumer_through(proxy_url, running)
    _drain(first, running, 1)
    _lose_a_fetch(first, proxy, "unsent")
    received: list[Any] = []
    second = _consumer_through(proxy_url, received)
    try:
        _drain(second, received, 1)
        assert [m.decode() for m in running + received] == [{"n": 1}, {"n": 2}]
        assert client.hexists("unacked", running[0].delivery_tag)  # still running
        assert _queued(client) == []
        received[0].ack()
        assert client.hkeys("unacked") == [running[0].delivery_tag.encode()]
        assert not broker._lost_fetches
    finally:
        second.close()
        first.release()


def test_a_fetch_dropped_by_a_disconnect_is_put_back_after_the_channel_closes(
    url: str, redis_server: RedisServer
) -> None:
    # The connection drops with the FETCH's reply unread and nothing to ack; the worker
    # closes that channel and reconnects. The next fetch must still find the message.
    from workers.celery import broker

    client = redis_server.client(DB)
    _publish(url, {"n": 1})
    first = _connect(url, visibility_timeout=3600)
    channel = _consume(first, [])
    channel.client.connection = channel.client.connection_pool.get_connection()
    channel._brpop_start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and client.hlen("unacked") == 0:
        time.sleep(0.01)
    channel.client.connection.disconnect()  # kombu then forgets the pending reply
    first.close()
    assert _queued(client) == [] and client.hlen("unacked") == 1
    received: list[Any] = []
    second = _consumer_through(url, received)
    try:
        _drain(second, received, 1)
        assert [m.decode() for m in received] == [{"n": 1}]
        assert not broker._lost_fetches
    finally:
        second.close()
