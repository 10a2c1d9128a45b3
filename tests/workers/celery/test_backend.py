"""The fleet's result backend (workers/celery/backend.py) on a real redis-server: an atomic
check-and-store that never overwrites a SUCCESS, publishes like Celery's, and carries the
pipeline's settle writes in the same script call."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

from producer.client import ActionClient
from tests.conftest import RedisServer, start_worker
from workers.celery.backend import (
    FleetRedisBackend,
    Rider,
    _combined,
    ride_with_result,
    take_riders,
)
from workers.guarantees.admission import ADMIT, SETTLE
from workers.guarantees.idempotency import IdempotencyStore

DB = 11
SET_ARG = "redis.call('SET', KEYS[1], ARGV[1]) return 1"


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[Celery]:
    redis_server.client(DB).flushdb()
    url = redis_server.url(DB)
    celery = Celery("backend-test", set_as_current=False, broker=url, backend=url)
    celery.conf.result_serializer = "json"
    celery.backend_cls = "workers.celery.backend:FleetRedisBackend"
    yield celery
    take_riders()  # nothing leaks into the next test
    celery.close()


def _stored(redis_server: RedisServer, task_id: str) -> dict:
    raw = redis_server.client(DB).get(f"celery-task-meta-{task_id}")
    assert raw is not None
    return json.loads(raw)


def test_stores_publishes_and_keeps_the_expiry(app: Celery, redis_server: RedisServer) -> None:
    assert isinstance(app.backend, FleetRedisBackend)
    task_id = str(uuid.uuid4())
    pubsub = redis_server.client(DB).pubsub()
    pubsub.subscribe(f"celery-task-meta-{task_id}")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    app.backend.store_result(task_id, {"status": "succeeded"}, states.SUCCESS)
    meta = _stored(redis_server, task_id)
    assert (meta["status"], meta["result"], meta["task_id"]) == (
        "SUCCESS",
        {"status": "succeeded"},
        task_id,
    )
    message = pubsub.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["status"] == "SUCCESS"
    ttl = redis_server.client(DB).ttl(f"celery-task-meta-{task_id}")
    assert 0 < ttl <= app.backend.expires
    # The client side (a plain Celery backend) reads it back.
    assert app.AsyncResult(task_id).get(timeout=5) == {"status": "succeeded"}
    pubsub.close()


@pytest.mark.parametrize("state", [states.SUCCESS, states.FAILURE, states.RETRY, states.STARTED])
def test_the_lean_result_meta_is_celerys(app: Celery, state: str) -> None:
    # The backend builds the meta itself (no config lookup, no time zone round trip):
    # the same keys and values as Celery's own, and a UTC date_done when final.
    backend = app.backend
    assert backend._lean_meta
    request = Context(group="g-1", parent_id="p-1", children=[])
    ours = backend._get_result_meta({"n": 1}, state, None, request)
    celerys = RedisBackend._get_result_meta(backend, {"n": 1}, state, None, request)
    ours_done, celerys_done = ours.pop("date_done"), celerys.pop("date_done")
    assert ours == celerys
    if state in states.READY_STATES:
        t1, t2 = datetime.fromisoformat(ours_done), datetime.fromisoformat(celerys_done)
        assert t1.utcoffset() == t2.utcoffset() == timedelta(0)
        assert abs((t2 - t1).total_seconds()) < 5
    else:
        assert ours_done is celerys_done is None


def test_results_encode_as_kombu_would(app: Celery) -> None:
    backend = app.backend
    meta = {"status": "SUCCESS", "result": {"text": "héllo ✓", "n": [1, 2.5, None]}}
    fast = backend._encode_meta(meta)
    assert isinstance(fast, bytes)  # orjson
    assert backend.decode(fast) == backend.decode(backend.encode(meta)) == meta
    # What orjson cannot write, or would write differently, goes through kombu.
    for odd in (2**70, datetime(2026, 1, 2, tzinfo=UTC)):
        slow = backend._encode_meta({"result": odd})
        assert isinstance(slow, str) and backend.decode(slow) == {"result": odd}


def test_a_success_is_never_overwritten(app: Celery, redis_server: RedisServer) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, {"n": 1}, states.SUCCESS)
    app.backend.store_result(task_id, {"n": 2}, states.RETRY)
    app.backend.store_result(task_id, {"n": 3}, states.SUCCESS)
    assert _stored(redis_server, task_id)["result"] == {"n": 1}
    other = str(uuid.uuid4())  # a non-final state is replaced as usual
    app.backend.store_result(other, None, states.RETRY)
    app.backend.store_result(other, {"n": 4}, states.SUCCESS)
    assert _stored(redis_server, other)["result"] == {"n": 4}


def test_riders_run_once_in_the_same_transaction(app: Celery, redis_server: RedisServer) -> None:
    r = redis_server.client(DB)
    ride_with_result(Rider(SET_ARG, ("rider:a",), ("1",)))
    ride_with_result(Rider(SET_ARG, ("rider:b",), ("2",)))
    first = str(uuid.uuid4())
    app.backend.store_result(first, 1, states.SUCCESS)
    assert (r.get("rider:a"), r.get("rider:b")) == (b"1", b"2")
    assert take_riders() == ()  # consumed by that store
    r.delete("rider:a", "rider:b")
    app.backend.store_result(str(uuid.uuid4()), 2, states.SUCCESS)
    assert r.get("rider:a") is None  # never carried over to the next result


def test_riders_run_when_the_store_fails(app: Celery, redis_server: RedisServer) -> None:
    # As in a MULTI/EXEC, each part runs whatever the others did: a result key of the
    # wrong type fails the store (reported), and the settle write still happens.
    r = redis_server.client(DB)
    task_id = str(uuid.uuid4())
    r.lpush(f"celery-task-meta-{task_id}", "not a result")
    ride_with_result(Rider(SET_ARG, ("rider:c",), ("3",)))
    with pytest.raises(BackendStoreError, match="WRONGTYPE"):
        app.backend._store_result(task_id, 1, states.SUCCESS)
    assert r.get("rider:c") == b"3"


def test_a_failing_rider_does_not_lose_the_result(
    app: Celery, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    ride_with_result(Rider("return redis.call('NOSUCHCOMMAND')", ("rider:x",), ()))
    task_id = str(uuid.uuid4())
    with caplog.at_level(logging.ERROR, logger="workers.celery.backend"):
        app.backend.store_result(task_id, {"ok": True}, states.SUCCESS)
    assert _stored(redis_server, task_id)["result"] == {"ok": True}
    assert any("settle write" in rec.getMessage() for rec in caplog.records)


def test_a_worker_settles_in_the_results_transaction(
    redis_server: RedisServer,
    make_client: Callable[[str], ActionClient],
    tmp_path: Path,
) -> None:
    # Through a real worker: the idempotency record is completed, and the action cost one
    # script call before the executor (admit) and one after it (the result with its
    # settle rider) -- no separate settle round trip, no MULTI/EXEC.
    db = 12
    r = redis_server.client(db)
    r.flushdb()
    url = redis_server.url(db)
    worker = start_worker(url, tmp_path / "home", queues="actions.files", concurrency=1)
    try:
        client = make_client(url)
        write = {
            "primitive": "files",
            "tenant_id": "ride",
            "agent_id": "a",
            "payload": {"op": "write", "path": "x.txt", "content": "hi"},
        }
        assert client.run(write, timeout=60).status == "succeeded"
        action = client.validate(write | {"payload": {"op": "stat", "path": "x.txt"}})
        with _Monitor(r, db) as commands:
            result = client.run(action.model_dump(mode="json"), timeout=60)
            assert result.status == "succeeded"
            time.sleep(0.2)  # the worker acknowledges after the result is stored
        scripts = Counter(c.split()[1] for c in commands if c.startswith("EVALSHA"))
        assert scripts[_sha(ADMIT)] == 1, commands
        assert scripts[_sha(SETTLE)] == 0, commands  # no settle round trip of its own
        assert scripts[_sha(_combined((Rider(SETTLE, (), ()),)))] == 1, commands
        # The fleet's own scripts; kombu refreshes its pidbox binding with a script in a
        # MULTI of its own now and then (``_kombu.binding*`` keys), which is not ours.
        ours = [c for c in _in_transactions(commands, "EVAL") if "_kombu.binding" not in c]
        assert not ours, commands
        assert not [c for c in commands if c.startswith("EVAL ")], commands
        record = json.loads(r.get(IdempotencyStore.key("ride", action.idempotency_key or "")))
        assert record["s"] == "c" and json.loads(record["r"])["status"] == "succeeded"
    finally:
        worker.stop()


def _in_transactions(commands: list[str], prefix: str) -> list[str]:
    """Commands starting with ``prefix`` sent inside a MULTI/EXEC. (The transport's own
    MULTI records the first message an idle worker gets, workers/celery/broker.py.)"""
    inside, found = False, []
    for c in commands:
        if c in ("MULTI", "EXEC"):
            inside = c == "MULTI"
        elif inside and c.startswith(prefix):
            found.append(c)
    return found


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


class _Monitor:
    """The commands redis-server executes on database ``db`` (MONITOR), while open."""

    def __init__(self, r: redis.Redis, db: int) -> None:
        self.r, self.db, self.commands = r, db, []  # type: ignore[var-annotated]

    def __enter__(self) -> list[str]:
        self._monitor = self.r.monitor().__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self.commands

    def _read(self) -> None:
        for cmd in self._monitor.listen():
            if cmd["command"] == "ECHO monitor-stop":
                return
            if cmd.get("db") == self.db:
                self.commands.append(cmd["command"])

    def __exit__(self, *exc: object) -> None:
        self.r.echo("monitor-stop")
        self._thread.join(10)
        self._monitor.__exit__(*exc)
