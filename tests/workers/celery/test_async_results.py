"""Waiting for results on asyncio (``ActionClient.arun``, ``producer.async_results``)
against a real files worker on a redis-server of this module's own: many waits on one
event loop, a result stored before the wait, a wait that times out, and a subscription
killed while waiting (the result still arrives)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from producer.async_results import ResultWaiter
from producer.client import ActionClient
from producer.errors import ResultTimeout
from producer.transport import task_id_for
from tests.conftest import RedisServer, start_redis, start_worker
from workers.config import Settings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str]]:
    home = tmp_path_factory.mktemp("async-results")
    server = start_redis(home / "redis")
    url = server.url(0)
    worker = start_worker(
        url, home, queues="actions.files", concurrency=2, auth="off",
        workspace_root=str(home / "ws"),
    )  # fmt: skip
    yield server, url
    worker.stop()
    server.proc.terminate()
    server.proc.wait(10)


def _client(url: str) -> ActionClient:
    client = ActionClient(url, settings=Settings(broker_url=url), key=None)
    client.key = None  # the worker runs with auth off
    return client


def _write(n: int = 0, primitive: str = "files") -> dict[str, Any]:
    payload = {"op": "write", "path": f"a-{n}-{uuid.uuid4().hex}.txt", "content": str(n)}
    if primitive == "api":
        payload = {"method": "GET", "url": "http://127.0.0.1:9/never"}
    return {
        "primitive": primitive,
        "tenant_id": "acme",
        "agent_id": "async-1",
        "action_id": str(uuid.uuid4()),
        "payload": payload,
    }


class _CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what it is given (``asyncio.to_thread``,
    ``run_in_executor``, the loop's own name lookups)."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.jobs: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.jobs.append(getattr(fn, "__qualname__", repr(fn)))
        return super().submit(fn, *args, **kwargs)


def test_many_waits_share_one_loop_and_each_gets_its_own_result(
    fleet: tuple[RedisServer, str],
) -> None:
    _, url = fleet
    client = _client(url)
    actions = [_write(n) for n in range(40)]
    executor = _CountingExecutor()

    async def main() -> list[Any]:
        asyncio.get_running_loop().set_default_executor(executor)
        try:
            return await asyncio.gather(*(client.arun(a, timeout=90) for a in actions))
        finally:
            await client.aclose()

    results = asyncio.run(main())
    assert [r.action_id for r in results] == [a["action_id"] for a in actions]
    assert {r.status for r in results} == {"succeeded"}, results
    # Forty actions in flight, nothing handed to a thread (and connecting to 127.0.0.1
    # needs no name lookup in the executor).
    assert executor.jobs == [], executor.jobs


def test_a_result_stored_before_the_wait_is_returned_at_once(
    fleet: tuple[RedisServer, str],
) -> None:
    _, url = fleet
    client = _client(url)
    handle = client.submit(_write())
    first = handle.result(timeout=60)

    async def main() -> Any:
        try:
            return await handle.aresult(client.waiter(), timeout=60)
        finally:
            await client.aclose()

    again = asyncio.run(main())
    assert again == first and again.status == "succeeded"


def test_a_wait_with_no_worker_for_its_queue_times_out(
    fleet: tuple[RedisServer, str],
) -> None:
    _, url = fleet
    client = _client(url)
    handle = client.submit(_write(primitive="api"))  # no api worker here

    async def main() -> None:
        try:
            with pytest.raises(ResultTimeout, match=handle.action_id):
                await handle.aresult(client.waiter(), timeout=0.5)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_result_published_while_the_subscription_is_down_still_arrives(
    fleet: tuple[RedisServer, str],
) -> None:
    server, url = fleet
    client = _client(url)
    action = _write()
    admin = server.client()

    async def main() -> dict[str, Any] | None:
        waiter = ResultWaiter(url, poll_s=0.3)
        try:
            wait = asyncio.create_task(
                waiter.wait(task_id_for("acme", action["action_id"]), timeout=None)
            )
            mine: list[str] = []
            while not mine:  # the wait's subscription (the worker's own are psubscribe)
                await asyncio.sleep(0.02)
                mine = [
                    c["id"]
                    for c in admin.client_list(_type="pubsub")
                    if c.get("cmd") == "subscribe" and c.get("sub") == "1"
                ]
            for client_id in mine:  # dropped: the publish will find no one
                admin.client_kill_filter(_id=client_id)
            # Run it while blocking this loop: the result is stored and published before
            # the waiter can subscribe again, so only reading the stored result finds it.
            assert client.run(action, timeout=60).status == "succeeded"
            return await wait
        finally:
            await waiter.close()

    meta = asyncio.run(main())
    client.close()
    assert meta is not None and meta["status"] == "SUCCESS"
    assert meta["result"]["action_id"] == action["action_id"]
    assert meta["result"]["status"] == "succeeded"
