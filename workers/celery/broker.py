"""kombu's Redis transport, with a fetch that cannot lose a message to a crash, and a
cheaper ack.

kombu consumes with BRPOP: a message leaves its queue list when Redis sends the reply,
and it is recorded in the ``unacked`` hash (what the visibility timeout restores from)
only after the worker has read that reply and sent a second command. A worker killed
in between loses the message for good -- and the window is not only microseconds: kombu
leaves a reply unread in the socket while the worker is out of prefetch credit, e.g.
just after its pool processes died and before it is killed itself.

Here, while the queues have messages, the pop and the ``unacked`` record are one Lua
script (``FETCH``), so a message is always in a queue list or in ``unacked``, never only
in flight. Redis has no blocking move from several lists (one per queue and priority),
so a worker whose fetch found every list empty waits with BRPOP as before, and goes
back to the script after that one message: the only delivery still exposed is the
first one an idle worker receives (docs/reliability.md). A fetch whose reply was lost
with its connection (a Redis restarting right after running it) is found again through
a marker the script writes: the worker's next fetch puts that message back in its queue
instead of leaving it to the visibility timeout.

An ack costs no round trip of its own in a worker: it is applied in Redis by the next
``FETCH``, which removes the acknowledged tags before it pops (the worker asks for its
next message right after an ack frees a prefetch slot, in the same turn of the event
loop). Acks that no fetch carries in that turn -- the consumer was cancelled, or a BRPOP
is waiting -- are sent by one ``ACK`` script call before the loop polls again, so an ack
is never held across a wait. Without an event loop (plain ``drain_events``) each ack is
sent at once. kombu's ack is MULTI/ZREM/HDEL/EXEC on a new ``redis.Redis`` per ack: a
sixth of the worker's CPU per trivial action, then one round trip (benchmarks/README.md).

``install_transport`` (called by ``workers.app``) makes it the transport of ``redis://``
and ``rediss://`` URLs in the worker process. Registering it under those names, rather
than naming the class in ``broker_transport``, keeps what kombu derives from the scheme:
TLS for ``rediss``, and the URL that Flower reads to find the broker. Queues consumed
without acknowledgements (pidbox replies) and a ``global_keyprefix`` keep plain BRPOP.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import deque
from queue import Empty
from time import monotonic, time
from typing import Any
from uuid import uuid4

import redis as redis_py
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from workers.celery.pinned_script import PinnedScript

__all__ = ["FETCH", "Channel", "Poller", "QoS", "Transport", "install_transport"]

log = logging.getLogger(__name__)

# KEYS: unacked_index, unacked, the channel's fetch marker, then the queue lists in
# BRPOP's order (priority first). ARGV[1]: the marker's TTL (ms); ARGV[2]: now (unix s,
# the worker's clock, as kombu scores its own entries); ARGV[3]: this fetch's number;
# ARGV[4..]: delivery tags acknowledged since the last fetch, removed first (what ACK
# does). Pops the first message and records it exactly as kombu's QoS.append would:
# unacked[tag] = [message, exchange, routing_key], unacked_index[tag] = now; and in the
# marker "<number> <tag>", so a channel that never read this reply can find the message.
FETCH = """
if #ARGV > 3 then
  redis.call('ZREM', KEYS[1], unpack(ARGV, 4))
  redis.call('HDEL', KEYS[2], unpack(ARGV, 4))
end
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, m = pcall(cjson.decode, item)
    local p = ok and type(m) == 'table' and m.properties
    local tag = type(p) == 'table' and p.delivery_tag
    if type(tag) == 'string' then
      local d = type(p.delivery_info) == 'table' and p.delivery_info or {}
      redis.call('ZADD', KEYS[1], ARGV[2], tag)
      redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. cjson.encode(d.exchange or '')
                 .. ',' .. cjson.encode(d.routing_key or '') .. ']')
      redis.call('SET', KEYS[3], ARGV[3] .. ' ' .. tag, 'PX', ARGV[1])
    end
    return {KEYS[i], item}
  end
end
return false
"""
_FETCH_SHA = hashlib.sha1(FETCH.encode()).hexdigest()

# KEYS: unacked_index, unacked; ARGV: delivery tags. kombu's ack is the same two writes
# in a MULTI/EXEC pipeline: four commands where one script call does.
ACK = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
"""
# Tags per ACK call: far above what a worker acknowledges in one turn of its loop (its
# prefetch), low enough for Lua's unpack.
_ACK_CHUNK = 512

# (fetch marker, fetch number) of this process's FETCHes whose reply was lost with its
# connection. Such a fetch may have run: its message is then recorded as unacked but
# delivered to nobody, and the visibility timeout (an hour) would be its only way back.
# The process's next fetch, on whatever channel, puts it back in its queue first.
_lost_fetches: deque[tuple[str, str]] = deque()

# A fetched message whose reply waited longer than this in the socket (the worker was
# out of credit) gets its unacked score refreshed, so the visibility timeout counts from
# when the worker took it, as with kombu's own record.
_RESCORE_AFTER_S = 1.0


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        channel = self.channel
        if channel.global_keyprefix:  # the prefixing client does not rewrite script keys
            return super().ack(delivery_tag)
        channel._acks.append(delivery_tag)
        # Sent now when no loop turn will carry it: no event loop, or the channel is
        # closed (the connection was lost while the task ran; kombu's ack goes through
        # the channel's connection pool then, and so does this one).
        if channel.closed or not channel.connection.cycle.ticking:
            channel.flush_acks()
        return VirtualQoS.ack(self, delivery_tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched_at = self.channel._fetched.pop(delivery_tag, None)
        if fetched_at is None:  # delivered by BRPOP: record it now, as kombu does
            return super().append(message, delivery_tag)
        if monotonic() - fetched_at > _RESCORE_AFTER_S:
            with self.channel.conn_or_acquire() as client:
                client.zadd(self.unacked_index_key, {delivery_tag: time()}, xx=True)
        VirtualQoS.append(self, message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetched: dict[str, float] = {}  # tag -> when FETCH recorded it
        self._noack_queues: set[str] = set()
        self._try_fetch = True  # False after FETCH found every list empty
        self._fetch_marker = f"{self.unacked_key}:fetch:{uuid4().hex}"
        self._fetch_no = 0
        self._unread_fetch: int | None = None  # number of the FETCH whose reply is pending
        self._script_loaded = False
        self._fetch_args: dict[tuple[str, ...], list[bytes]] = {}
        self._sync_client: redis_py.Redis | None = None
        self._ack_script: PinnedScript | None = None
        self._acks: list[str] = []  # acknowledged here, not yet in Redis
        self._fetch_acks: list[str] = []  # carried by the FETCH whose reply is pending

    def _take_back_fetch_acks(self) -> None:
        # The FETCH that carried them has no reply to read (lost with its connection):
        # applied or not, they are sent again; removing a tag twice is a no-op.
        self._acks[:0], self._fetch_acks = self._fetch_acks, []

    def _fetch_lost(self) -> None:
        """The pending FETCH's reply will never be read: maybe it ran, maybe not."""
        self._take_back_fetch_acks()
        if self._unread_fetch is not None:
            _lost_fetches.append((self._fetch_marker, str(self._unread_fetch)))
            self._unread_fetch = None

    def _forget_dropped_fetch(self) -> None:
        # A FETCH was sent but nothing will read its reply any more: a reconnect dropped
        # it (kombu's ``_on_connection_disconnect`` clears ``_in_poll``).
        if self._unread_fetch is not None and not self._in_poll:
            self._fetch_lost()

    def _restore_lost_fetches(self) -> None:
        # The marker says what the channel's latest FETCH that ran popped. Its number
        # tells a lost fetch that ran (restore) from one that never reached Redis (the
        # marker then names an earlier message, which was delivered: leave it).
        with self.conn_or_acquire() as client:
            while _lost_fetches:
                marker, number = _lost_fetches[0]
                fetched = bytes_to_str(client.get(marker) or b"").split(" ", 1)
                if fetched[0] == number:
                    self.qos.restore_by_tag(fetched[1], client)
                    log.warning("put back message %s, whose fetch reply was lost", fetched[1])
                client.delete(marker)
                _lost_fetches.popleft()

    def flush_acks(self) -> None:
        """Send the acks no FETCH carried, in ``ACK`` script calls."""
        self._forget_dropped_fetch()
        while self._acks:
            tags = self._acks[:_ACK_CHUNK]
            with self.conn_or_acquire() as client:
                script = self._ack_script
                if script is None or script.client is not client:
                    script = self._ack_script = PinnedScript(client, ACK)
                script(keys=(self.qos.unacked_index_key, self.qos.unacked_key), args=tags)
            del self._acks[: len(tags)]

    def close(self) -> None:
        if not self.closed:
            # Acks or not: a lost fetch recorded now is put back by the next connection.
            self._forget_dropped_fetch()
        if not self.closed and (self._acks or self._fetch_acks):
            errors = (*self.connection_errors, redis_py.RedisError)
            if self._in_poll:  # the pending reply first, as kombu's close reads it too
                with contextlib.suppress(Empty, *errors):
                    self._brpop_read()
            try:
                self.flush_acks()
            except errors:
                # Still recorded as unacknowledged: back after the visibility timeout,
                # and answered from the stored result, not run again.
                log.warning("%d acks not sent before close", len(self._acks))
        super().close()

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis.Redis (with its table of ~200 response callbacks) for
        # every ack; a client is only a handle on the pool, so one per pool will do.
        if asynchronous or self.global_keyprefix:
            return super()._create_client(asynchronous)
        client = self._sync_client
        if self.closed and client is not None:
            # A task that ran while the connection was lost acks on its old, closed
            # channel. kombu can build no client then (AttributeError, which ends the
            # worker); this one's pool reconnects on demand, so the ack still goes out.
            return client
        pool = self.pool
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("no_ack", args[0] if args else False):
            self._noack_queues.add(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def _fetch_command(self) -> list[bytes] | None:
        """The FETCH call for the queues' next turn up to its marker TTL, without the clock,
        the fetch number and the acks; None: BRPOP."""
        if not (self._try_fetch and self.ack_emulation) or self.global_keyprefix:
            return None
        queues = tuple(self._queue_cycle.consume(len(self.active_queues)))
        if not queues or self._noack_queues.intersection(queues):
            return None
        args = self._fetch_args.get(queues)
        if args is None:  # fixed per queue set: named and encoded once, not per message
            keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
            head = ("EVALSHA", _FETCH_SHA, str(len(keys) + 3))
            idx = (self.unacked_index_key, self.unacked_key, self._fetch_marker)
            # Past the visibility timeout any worker's sweep restores the message anyway.
            ttl_ms = str(int(self.visibility_timeout * 1000) + 60_000)
            args = [a.encode() for a in (*head, *idx, *keys, ttl_ms)]
            self._fetch_args[queues] = args
        return args

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._forget_dropped_fetch()
        if _lost_fetches:
            self._restore_lost_fetches()
        command = self._fetch_command()
        if command is None:
            return super()._brpop_start(timeout)
        if not self._script_loaded:
            with self.conn_or_acquire() as client:
                client.script_load(FETCH)
            self._script_loaded = True
        acks = self._fetch_acks = self._acks[:_ACK_CHUNK]
        del self._acks[: len(acks)]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self._fetch_no += 1
        self._unread_fetch = self._fetch_no
        self.client.connection.send_command(*command, time(), self._fetch_no, *acks)

    def _brpop_read(self, **options: Any) -> bool:
        if self._unread_fetch is None:
            delivered = super()._brpop_read(**options)  # raises Empty on a timeout
            self._try_fetch = True  # the queues had a message: fetch atomically again
            return delivered
        try:
            try:
                reply = self.client.connection.read_response()
            except self.connection_errors:
                self._fetch_lost()
                self.client.connection.disconnect()
                raise
            except redis_py.ResponseError as exc:
                self._unread_fetch = None  # the script did not run
                self._take_back_fetch_acks()
                # The script is gone (a restarted Redis) or refused (e.g. a full Redis
                # without eviction): BRPOP takes this message, the next fetch loads it.
                self._try_fetch = False
                self._script_loaded = not isinstance(exc, redis_py.exceptions.NoScriptError)
                raise Empty() from None
            self._unread_fetch = None
            self._fetch_acks = []
            if not reply:
                self._try_fetch = False  # every list empty: wait with BRPOP
                raise Empty()
            dest, item = reply
            message = loads(bytes_to_str(item))
            tag = message.get("properties", {}).get("delivery_tag")
            if isinstance(tag, str):
                self._fetched[tag] = monotonic()
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(message, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Poller(kombu_redis.MultiChannelPoller):
    ticking = False  # driven by an event loop: acks wait for the end of the loop's turn

    def on_poll_start(self) -> None:
        super().on_poll_start()  # sends each channel's next FETCH, which carries its acks
        for channel in self._channels:  # this transport's: always a ``Channel``
            if channel._acks:
                channel.flush_acks()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.cycle.ticking = True


def install_transport() -> None:
    """Serve ``redis://`` and ``rediss://`` connections made from now on with
    ``Transport`` (kombu's registry of transport names; idempotent)."""
    for scheme in ("redis", "rediss"):
        kombu_transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transport._transport_cache.pop(scheme, None)
