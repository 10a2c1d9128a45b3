"""The producer's own publish path (``producer/publish.py``) writes what Celery's
``send_task`` writes, to the list kombu's Redis transport reads, and a real worker runs it.

Against a redis-server of this module's own: the message of each path is read back from
the broker and compared field by field (the delivery tag, a fresh uuid, aside).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import ActionClient
from producer.errors import FleetUnavailable
from producer.models import queue_for, task_name_for
from producer.publish import Outgoing, _runs
from producer.transport import (
    kwargs_repr,
    redis_priority,
    redis_queue_keys,
    task_id_for,
)
from tests.conftest import RedisServer, start_redis, start_worker
from workers.config import Settings
from workers.ops.fleet import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    found = start_redis(tmp_path_factory.mktemp("publish") / "redis")
    yield found
    found.proc.terminate()
    found.proc.wait(10)


def _client(url: str) -> ActionClient:
    client = ActionClient(url, settings=Settings(broker_url=url), key=None)
    client.key = None
    return client


def _stat(priority: int = 0, path: str = "x.txt") -> dict[str, Any]:
    return {
        "primitive": "files",
        "tenant_id": "acme",
        "agent_id": "pub-1",
        "action_id": str(uuid.uuid4()),
        "priority": priority,
        "payload": {"op": "stat", "path": path},
    }


def _pushed(r: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message on ``queue``'s lists, oldest first, with the list it is on."""
    out: list[tuple[str, dict[str, Any]]] = []
    for key in redis_queue_keys(queue):
        out += [(key, json.loads(raw)) for raw in reversed(r.lrange(key, 0, -1))]
    return out


@pytest.mark.parametrize("priority", [0, 3, 9])
def test_the_message_is_the_one_send_task_writes(server: RedisServer, priority: int) -> None:
    url = server.url(1)
    r = server.client(1)
    r.flushdb()
    client = _client(url)
    action = client.validate(_stat(priority))
    client.send(action)  # the publish path
    client._app.send_task(  # Celery's own, as the client sent it before producer/publish.py
        task_name_for(action.primitive),
        kwargs={"message": action.model_dump(mode="json", by_alias=True)},
        queue=queue_for(action.primitive),
        declare=[],
        task_id=task_id_for(action.tenant_id, action.action_id),
        priority=redis_priority(action.priority),
        argsrepr="()",
        kwargsrepr=kwargs_repr(action.primitive, action.action_id, action.tenant_id),
    )
    (ours_key, ours), (celery_key, celery) = _pushed(r, queue_for("files"))
    client.close()

    assert ours_key == celery_key  # the same priority list
    assert ours["properties"].pop("delivery_tag") != celery["properties"].pop("delivery_tag")
    # send_task also copies its repr options into the properties, which nothing reads.
    for copied in ("argsrepr", "kwargsrepr"):
        celery["properties"].pop(copied)
    # The body is the same JSON value; only its spacing differs (compact here).
    body = json.loads(base64.b64decode(ours.pop("body")))
    assert body == json.loads(base64.b64decode(celery.pop("body")))
    assert body[1]["message"]["action_id"] == action.action_id
    assert ours == celery


def test_send_many_pushes_every_action_in_order(server: RedisServer) -> None:
    url = server.url(2)
    r = server.client(2)
    r.flushdb()
    client = _client(url)
    actions = [client.validate(_stat(path=f"f-{n}.txt")) for n in range(1100)]  # > 2 slices
    handles = client.send_many(actions)
    pushed = _pushed(r, queue_for("files"))
    client.close()
    assert [h.action_id for h in handles] == [a.action_id for a in actions]
    ids = [m["headers"]["id"] for _, m in pushed]
    assert ids == [f"acme+{a.action_id}" for a in actions]


def test_runs_group_consecutive_messages_per_list() -> None:
    msgs = [
        Outgoing("a", b"1"),
        Outgoing("a", b"2"),
        Outgoing("b", b"3"),  # another list ends the run
        Outgoing("a", b"4"),
        Outgoing("a", b"5"),
    ]
    runs = _runs(msgs)
    assert runs == [["a", b"1", b"2"], ["b", b"3"], ["a", b"4", b"5"]]


def test_large_actions_go_in_several_commands_and_slices_in_order(server: RedisServer) -> None:
    """12 actions of ~3.2 MB as messages (2.4 MB of content, base64 in the envelope): the
    32 MiB slice ends after the 11th -- one LPUSH of 11, then one of the 12th; without the
    slice's byte cap it would be one LPUSH of all 12."""
    url = server.url(4)
    r = server.client(4)
    r.flushdb()
    r.config_resetstat()
    client = _client(url)
    big = "x" * 2_400_000
    actions = [
        client.validate(_stat() | {"payload": {"op": "write", "path": f"b{n}.txt", "content": big}})
        for n in range(12)
    ]
    client.send_many(actions)
    lpushes = r.info("commandstats")["cmdstat_lpush"]["calls"]
    pushed = _pushed(r, queue_for("files"))
    client.close()
    r.flushdb()
    assert lpushes == 2
    assert [m["headers"]["id"] for _, m in pushed] == [f"acme+{a.action_id}" for a in actions]


def test_a_broker_that_is_not_redis_is_refused_up_front() -> None:
    with pytest.raises(FleetUnavailable, match="must be Redis"):
        ActionClient("amqp://guest@127.0.0.1:5672//", key=None)


def test_a_broker_that_does_not_answer_is_fleet_unavailable_without_its_password() -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    client = ActionClient(url, settings=Settings(broker_url=url), key=None)
    client.key = None
    with pytest.raises(FleetUnavailable) as raised:
        client.submit(_stat())
    assert "s3cret-pw" not in str(raised.value)
    assert "127.0.0.1" in str(raised.value)


def test_a_real_worker_runs_what_was_published_sync_and_async(
    server: RedisServer, tmp_path: Path
) -> None:
    import asyncio

    url = server.url(3)
    server.client(3).flushdb()
    worker = start_worker(
        url, tmp_path, queues="actions.files", concurrency=2, auth="off",
        workspace_root=str(tmp_path / "ws"),
    )  # fmt: skip
    try:
        client = _client(url)
        write = _stat(priority=7) | {
            "payload": {"op": "write", "path": "published.txt", "content": "hello"}
        }
        assert client.run(write, timeout=60).status == "succeeded"
        many = client.send_many([client.validate(_stat(path="published.txt")) for _ in range(20)])
        assert {h.result(timeout=60).output["size"] for h in many} == {5}  # type: ignore[index]

        async def read() -> Any:
            read = _stat() | {"payload": {"op": "read", "path": "published.txt"}}
            try:
                return await client.arun(read, timeout=60)
            finally:
                await client.aclose()

        result = asyncio.run(read())
        assert result.status == "succeeded", result
        assert result.output["content"] == "hello"  # type: ignore[index]
    finally:
        worker.stop()
