"""Helpers for the reliability tests: probe workers and probe actions.

The probe (workers/executors/probe.py) is a TEST-ONLY FAKE executor serving the ``code``
queue without containers, so a test can run hundreds of actions a second, fail on
demand and count effects. Everything around it is real: redis-server, Celery worker
subprocesses, the client, the pipeline and its Redis limits.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer, Worker, start_redis, start_worker
from workers.executors.probe import read_log


def probe_worker(
    url: str, home: Path, probe_dir: Path, *, concurrency: int = 2, **extra: str
) -> Worker:
    return start_worker(
        url,
        home,
        queues="actions.code",
        concurrency=concurrency,
        test_probe_executor="1",
        test_probe_dir=str(probe_dir),
        **extra,
    )


def probe_action(tenant: str, agent: str = "tester", **spec: Any) -> dict[str, Any]:
    envelope = {k: spec.pop(k) for k in ("on_limit", "deadline", "idempotency_key") if k in spec}
    return {
        "primitive": "code",
        "tenant_id": tenant,
        "agent_id": agent,
        "payload": {"language": "python", "source": json.dumps(spec)},
        **envelope,
    }


def runs(probe_dir: Path) -> list[dict[str, Any]]:
    return read_log(probe_dir / "runs.log")


def effects(probe_dir: Path) -> Counter[str]:
    return Counter(e["action_id"] for e in read_log(probe_dir / "effects.log"))


@pytest.fixture(scope="module")
def redis_own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own (these tests restart and flush it)."""
    server = start_redis(tmp_path_factory.mktemp("redis-own"))
    yield server
    server.proc.terminate()
    server.proc.wait(10)


def fresh_url(redis_own: RedisServer, db: int) -> str:
    """The URL of database ``db``, emptied first."""
    redis_own.client(db).flushdb()
    return redis_own.url(db)


def applied(probe_dir: Path) -> Counter[str]:
    """Effects the fake upstream applied, per idempotency key (its atomic records)."""
    records = [json.loads(p.read_text()) for p in (probe_dir / "applied").glob("[!.]*")]
    return Counter(r["key"] for r in records)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def event_lines(worker: Worker, action_id: str, stage: str) -> list[dict[str, Any]]:
    """The ``actionfleet.events`` JSON lines a worker logged for one action and stage."""
    out = []
    for line in worker.log.read_text().splitlines():
        start = line.find('{"stage"')
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if record.get("action_id") == action_id and record.get("stage") == stage:
            out.append(record)
    return out


def whereabouts(client: Any, task_id: str, queue: str = "actions.code") -> dict[str, Any]:
    """Where a task's message is now, for a failure message: in a queue list, in kombu's
    unacked hash (delivered, not acknowledged), and whether a result is stored."""
    from producer.transport import redis_queue_keys

    queued = [
        k for k in redis_queue_keys(queue) for m in client.lrange(k, 0, -1) if task_id.encode() in m
    ]
    unacked = [t for t, m in client.hscan_iter("unacked") if task_id.encode() in m]
    return {
        "queued_in": queued,
        "unacked_tags": unacked,
        "result": client.get(f"celery-task-meta-{task_id}"),
        "unacked_mutex_ttl_ms": client.pttl("unacked_mutex"),
    }
