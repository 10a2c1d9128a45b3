"""The Prometheus endpoint reports what Redis really holds.

Real redis-server, real ActionClient sends (every primitive, several priorities), a real
Celery worker subprocess running a real sandboxed action for the in-flight count, and the
endpoint scraped over HTTP on loopback and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.client import ActionClient
from producer.models import PRIMITIVES, queue_for
from tests.conftest import RedisServer, code_action, start_redis, start_worker
from workers.config import Settings
from workers.guarantees.deadletter import DeadLetterStore
from workers.ops.metrics import MetricsServer, record_rate_limit_deferral, start_metrics_server

# Valid sample payloads of every primitive (nothing consumes them in these tests).
PAYLOADS = {
    "browse": {"url": "http://127.0.0.1:9/", "extract": ["title"]},
    "code": {"language": "python", "source": "print(1)"},
    "files": {"op": "write", "path": "m/hello.txt", "content": "hello"},
    "email": {"to": ["ops@example.com"], "subject": "m", "text": "hi"},
    "api": {"method": "GET", "url": "http://127.0.0.1:9/health"},
}
# Queued per primitive: distinct numbers, so a queue mixed up with another shows.
QUEUED = {"browse": 3, "code": 5, "files": 1, "email": 0, "api": 7}


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def per_queue(samples: dict, name: str) -> dict[str, float]:
    return {dict(labels)["queue"]: v for (n, labels), v in samples.items() if n == name}


@pytest.fixture
def redis_only(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone: kombu's ``unacked`` hash is per database, shared."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.proc.terminate()
    server.proc.wait(10)


@pytest.fixture
def metrics(redis_only: RedisServer) -> Iterator[MetricsServer]:
    server = start_metrics_server(redis_only.url(), host="127.0.0.1", port=0)
    yield server
    server.stop()


def _enqueue(url: str) -> None:
    client = ActionClient(url, settings=Settings(broker_url=url), primitives=PRIMITIVES)
    try:
        for primitive, n in QUEUED.items():
            for i in range(n):
                client.submit(
                    {
                        "primitive": primitive,
                        "tenant_id": "acme",
                        "agent_id": "metrics-test",
                        "priority": i % 10,  # spread over kombu's per-priority lists
                        "payload": PAYLOADS[primitive],
                    }
                )
    finally:
        client.close()


def test_queue_depths_while_work_is_queued(redis_only: RedisServer, metrics: MetricsServer) -> None:
    before = scrape(metrics)
    assert before[("actionfleet_broker_up", ())] == 1
    assert per_queue(before, "actionfleet_queue_depth") == {queue_for(p): 0 for p in PRIMITIVES}

    _enqueue(redis_only.url())

    after = scrape(metrics)
    expected = {queue_for(p): n for p, n in QUEUED.items()}
    assert per_queue(after, "actionfleet_queue_depth") == expected
    assert per_queue(after, "actionfleet_actions_in_flight") == dict.fromkeys(expected, 0)
    assert per_queue(after, "actionfleet_queue_backlog") == expected
    # The priorities really landed on several lists: the sum is not one LLEN.
    keys = [k.decode() for k in redis_only.client().keys("actions.api*")]
    assert len(keys) > 1, keys


def test_audit_dead_letters_and_deferrals(redis_only: RedisServer, metrics: MetricsServer) -> None:
    r = redis_only.client()
    for i in range(4):
        r.xadd("actionfleet:audit", {"event": f"e{i}"})
    r.xadd("actionfleet:audit:dead", {"reason": "bad"})
    record_rate_limit_deferral(r, "api", 2)
    record_rate_limit_deferral(r, "api")
    record_rate_limit_deferral(r, "browse")
    DeadLetterStore(r).put(
        {"tenant_id": "acme", "agent_id": "a"},
        [],
        {"action_id": "dead-1", "primitive": "api", "error": {"type": "upstream_error"}},
    )

    s = scrape(metrics)
    assert s[("actionfleet_audit_stream_length", ())] == 4
    assert s[("actionfleet_audit_dead_letters", ())] == 1
    assert s[("actionfleet_dead_letters", ())] == 1
    deferrals = {
        dict(labels)["primitive"]: v
        for (n, labels), v in s.items()
        if n == "actionfleet_rate_limit_deferrals_total"
    }
    assert deferrals == {"browse": 1, "code": 0, "files": 0, "email": 0, "api": 3}


def test_broker_down_is_reported_not_an_error(redis_only: RedisServer, tmp_path: Path) -> None:
    server = start_metrics_server(redis_only.url(), port=0)
    try:
        redis_only.proc.terminate()
        redis_only.proc.wait(10)
        s = scrape(server)
        assert s[("actionfleet_broker_up", ())] == 0
        assert not per_queue(s, "actionfleet_queue_depth")
    finally:
        server.stop()


@pytest.mark.slow
def test_in_flight_counts_unacked_work(
    redis_only: RedisServer, metrics: MetricsServer, sandbox_image: str, tmp_path: Path
) -> None:
    """One worker process busy with a slow action, two more waiting: 1 in flight, 2 queued.

    This is the number KEDA's redis-lists trigger cannot see (the list holds only 2).
    """
    url = redis_only.url()
    worker = start_worker(url, tmp_path / "home", queues="actions.code", concurrency=1)
    client = ActionClient(url, settings=Settings(broker_url=url))
    try:
        slow = code_action("import time; time.sleep(6); print('done')", timeout_s=30)
        handles = [client.submit(slow) for _ in range(3)]
        deadline = time.monotonic() + 30
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            s = scrape(metrics)
            seen = {
                "flight": per_queue(s, "actionfleet_actions_in_flight")["actions.code"],
                "depth": per_queue(s, "actionfleet_queue_depth")["actions.code"],
                "backlog": per_queue(s, "actionfleet_queue_backlog")["actions.code"],
            }
            if seen["flight"] >= 1:
                break
            time.sleep(0.2)
        # prefetch multiplier 1 and one process: exactly one delivered, two still listed.
        assert seen == {"flight": 1, "depth": 2, "backlog": 3}, seen
        for h in handles:
            assert h.result(timeout=120).status == "succeeded"
        # The worker acknowledges a message just after storing its result (acks late), so
        # the last one may still count for a moment; a lost ack would count until the
        # visibility timeout (an hour), far past this deadline.
        deadline = time.monotonic() + 10
        while True:
            s = scrape(metrics)
            left = per_queue(s, "actionfleet_actions_in_flight")["actions.code"]
            if left == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert left == 0
        assert per_queue(s, "actionfleet_queue_backlog")["actions.code"] == 0
    finally:
        client.close()
        worker.stop()
