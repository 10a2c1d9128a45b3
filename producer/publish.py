"""Publishing task messages straight onto the broker's Redis lists.

Celery's ``send_task`` spends about 0.3 ms of CPU per message in producer pools, retry
wrappers and signals around one LPUSH, and makes one round trip per message: for a batch of
100,000 actions, or an MCP server answering many agents, that is most of the producer's
cost. The message stays Celery's own: its headers and body come from Celery's
``app.amqp.create_task_message`` and its envelope is the one kombu's Redis transport writes
(``prepare_message``, then the body base64-encoded with a fresh delivery tag), so a worker
cannot tell it apart (``tests/producer/test_publish.py`` compares it with ``send_task``'s).
What changes is the path: many messages go in one round trip, as one LPUSH per run of
messages to the same list, and an asyncio caller pushes without blocking its loop.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.transport import redis_queue_key

__all__ = ["Outgoing", "RedisPublisher", "redis_url"]

_PERSISTENT = 2  # kombu's delivery_mode for messages that survive a broker restart
# As Celery's default publish retry: a few quick attempts, then the error.
_RETRIES = 3
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0


def redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis broker this module can publish to."""
    return url.split("://", 1)[0] in ("redis", "rediss")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One serialized message and the Redis list it goes to."""

    key: str
    payload: bytes


def _runs(messages: Sequence[Outgoing]) -> list[list[str | bytes]]:
    """``[key, payload, payload, ...]`` per run of consecutive messages to one list. LPUSH
    with many values pushes them left to right, so the worker's BRPOP still takes them in
    the order given, and Redis parses one command instead of one per message. The caller
    bounds the bytes of one call (``ActionClient.send_many``'s slices), and so of a
    command, far below Redis's client query buffer limit (1 GB)."""
    runs: list[list[str | bytes]] = []
    for message in messages:
        if runs and runs[-1][0] == message.key:
            runs[-1].append(message.payload)
        else:
            runs.append([message.key, message.payload])
    return runs


class RedisPublisher:
    """Builds Celery task messages and pushes them to Redis, many in one round trip.

    ``publish`` is thread-safe (a connection pool); ``apublish`` uses one client per event
    loop. Raises ``redis.RedisError`` when the broker does not take the messages."""

    def __init__(self, app: Celery, url: str) -> None:
        if not redis_url(url):
            raise ValueError(f"not a Redis URL: {url.split('://', 1)[0]}://")
        self._app = app
        self._url = url
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), _RETRIES),
        )
        self._origin = anon_nodename()  # Celery's "origin" header: this host and process
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def build(
        self,
        task: str,
        queue: str,
        kwargs: dict[str, Any],
        *,
        task_id: str,
        priority: int = 0,
        kwargsrepr: str | None = None,
    ) -> Outgoing:
        """The message ``send_task(task, kwargs=kwargs, queue=queue, task_id=task_id,
        priority=priority, argsrepr="()", kwargsrepr=kwargsrepr)`` would push."""
        app = self._app
        parent = app.current_worker_task  # as send_task: a task sent from a task is its child
        root_id = (parent.request.root_id or parent.request.id) if parent else None
        parent_id = parent.request.id if parent else None
        headers, properties, body, _ = app.amqp.create_task_message(
            task_id,
            task,
            (),
            kwargs,
            reply_to=app.thread_oid,
            root_id=root_id,
            parent_id=parent_id,
            argsrepr="()",
            kwargsrepr=kwargsrepr,
            ignore_result=None,  # as send_task when the task does not say
            origin=self._origin,
        )
        properties.update(
            delivery_mode=_PERSISTENT,
            delivery_info={"exchange": "", "routing_key": queue},
            priority=priority,
            body_encoding="base64",
            delivery_tag=str(uuid.uuid4()),
        )
        envelope = {
            "body": base64.b64encode(orjson.dumps(body)).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        # orjson: the same JSON values kombu's encoder writes (compact), at a fraction of
        # its cost -- the message is built once per action on the producer's hot path.
        return Outgoing(redis_queue_key(queue, priority), orjson.dumps(envelope))

    def publish(self, messages: Sequence[Outgoing]) -> None:
        """Push ``messages`` in one round trip: one LPUSH per run of messages bound for the
        same list (a pipeline of them, not a transaction)."""
        runs = _runs(messages)
        if len(runs) == 1:
            self._client.lpush(*runs[0])
            return
        with self._client.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.lpush(*run)
            pipe.execute()

    async def apublish(self, messages: Sequence[Outgoing]) -> None:
        """``publish`` for asyncio, on the running loop's own connection."""
        client = self._aclient()
        runs = _runs(messages)
        if len(runs) == 1:
            await client.lpush(*runs[0])
            return
        async with client.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.lpush(*run)
            await pipe.execute()

    def _aclient(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_SOCKET_TIMEOUT_S,
                retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.1), _RETRIES),
            )
        return client

    async def aclose(self) -> None:
        """Close the running loop's connection."""
        client = self._aclients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        self._client.close()
