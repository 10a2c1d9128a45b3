"""Retries, exactly-once effects, and graceful operations, through real worker processes.

Real redis-server (restarted with appendonly in one test), real Celery worker
subprocesses (SIGKILLed and SIGTERMed), the real client; the executor is the TEST-ONLY
probe (tests/reliability_fixtures.py): it fails on demand and counts its effects.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from producer.client import ActionClient, ActionHandle
from producer.errors import ResultTimeout
from producer.models import ActionResult
from producer.transport import task_id_for
from tests.conftest import RedisServer, start_redis
from tests.reliability_fixtures import (
    applied,
    effects,
    event_lines,
    fresh_url,
    probe_action,
    probe_worker,
    runs,
    wait_for,
    whereabouts,
)
from workers.executors.probe import read_log
from workers.guarantees.idempotency import IdempotencyStore


def test_failing_twice_then_succeeding_is_retried(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 1), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe)
    try:
        client = make_client(url)
        result = client.run(probe_action("retry3", fail_times=2, effect=True), timeout=60)
        assert result.status == "succeeded", result
        assert result.attempt == 3
        assert result.output is not None and result.output["stdout"] == "probe run 3\n"
        assert [r["attempt"] for r in runs(probe)] == [1, 2, 3]
        assert effects(probe)[result.action_id] == 1
        retried = event_lines(worker, result.action_id, "retried")
        assert len(retried) == 2 and all(e["decision"] == "retry" for e in retried)
        assert len(event_lines(worker, result.action_id, "finished")) == 1
        # Not retried: a timeout (not in retry_on), nor a permanent error.
        timeout = client.run(probe_action("retry3", fail_times=5, fail_type="timeout"), 60)
        assert timeout.status == "timed_out" and timeout.attempt == 1
    finally:
        worker.stop()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    from tests.conftest import ROOT

    return subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", "dead", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_always_failing_is_dead_lettered_and_replay_runs_it_again(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:

    url, probe = fresh_url(redis_own, 2), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe)
    try:
        client = make_client(url)
        # Fails 3 times: all of retry3's attempts. The replay is the 4th run: it succeeds.
        handle = client.submit(probe_action("retry3", fail_times=3, effect=True))
        result = handle.result(timeout=60)
        assert result.status == "failed" and result.attempt == 3
        assert result.error is not None and result.error.type == "upstream_error"
        assert len(event_lines(worker, handle.action_id, "dead_lettered")) == 1

        listed = json.loads(_cli(worker.env, "list").stdout)
        assert [e["action_id"] for e in listed] == [handle.action_id]
        assert listed[0]["attempts"] == 3 and listed[0]["error_type"] == "upstream_error"
        shown = json.loads(_cli(worker.env, "show", handle.action_id).stdout)
        assert [a["attempt"] for a in shown["attempts"]] == [1, 2, 3]
        assert all(a["error"]["message"].startswith("probe failure") for a in shown["attempts"])
        assert shown["message"]["payload"] == handle.action.model_dump(mode="json")["payload"]
        assert shown["result"]["status"] == "failed"

        out = _cli(worker.env, "replay", handle.action_id)
        assert out.returncode == 0, out.stderr
        # Same action id: the agent's handle now sees the replay's result.
        wait_for(lambda: effects(probe)[handle.action_id] == 1, 30, "the replay's effect")
        # A fresh handle on the same id (the old one cached the first result).
        task_id = task_id_for(handle.action.tenant_id, handle.action_id)
        fresh = ActionHandle(handle.action, client._app.AsyncResult(task_id))
        replayed = fresh.result(timeout=30)
        assert replayed.status == "succeeded" and replayed.output is not None
        assert replayed.output["stdout"] == "probe run 4\n"
        assert json.loads(_cli(worker.env, "list").stdout) == []
        assert _cli(worker.env, "show", handle.action_id).returncode == 1

        other = client.run(probe_action("retry3", fail_times=9), timeout=60)
        assert other.status == "failed"
        assert json.loads(_cli(worker.env, "purge", "--all").stdout) == {"purged": 1}
        assert json.loads(_cli(worker.env, "list").stdout) == []
    finally:
        worker.stop()


def test_duplicate_deliveries_execute_once(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 3), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe, concurrency=3)
    try:
        client = make_client(url)
        first = client.run(probe_action("acme", idempotency_key="order-1", effect=True), 30)
        again = client.run(probe_action("acme", idempotency_key="order-1", effect=True), 30)
        assert again.model_dump() == first.model_dump()  # the stored result, verbatim
        # Concurrent duplicates: one runs, the other waits for it and gets its result.
        pair = client.submit_many(
            [probe_action("acme", idempotency_key="order-2", sleep_s=1.0) for _ in range(2)]
        )
        a, b = (h.result(timeout=60) for h in pair)
        assert a.model_dump() == b.model_dump() and a.status == "succeeded"
        keys = Counter(r["action_id"] for r in runs(probe))
        assert sorted(keys.values()) == [1, 1]  # order-1 once, order-2 once
        # Keys are per tenant: another tenant's "order-1" is its own action.
        other = client.run(probe_action("retry3", idempotency_key="order-1"), 30)
        assert other.action_id != first.action_id and len(runs(probe)) == 3
    finally:
        worker.stop()


def test_kill9_mid_batch_every_action_one_result_one_effect(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 4), tmp_path / "probe"
    settings = {"lease_s": "2", "visibility_timeout_s": "5"}
    doomed = probe_worker(url, tmp_path / "a", probe, concurrency=2, **settings)
    survivor = probe_worker(url, tmp_path / "b", probe, concurrency=2, **settings)
    try:
        client = make_client(url)
        keys = [f"job-{i}" for i in range(200)]
        batch = [probe_action("acme", sleep_s=0.05, effect=True, idempotency_key=k) for k in keys]
        handles = client.submit_many(batch)
        # At-least-once delivery, made visible: a third of the messages arrive twice
        # (new action id, same idempotency key).
        duplicates = client.submit_many(batch[::3])
        wait_for(lambda: len(read_log(probe / "effects.log")) >= 40, 60, "40 effects")
        for pid in [*doomed.pool_pids(), doomed.proc.pid]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        doomed.proc.wait(10)
        results = [_result_or_whereabouts(h, redis_own.client(4)) for h in handles + duplicates]
        assert [r.status for r in results] == ["succeeded"] * len(results)
        # A duplicate gets the result of the one delivery that ran (its action id too).
        by_key = {h.action.idempotency_key: r for h, r in zip(handles, results, strict=False)}
        for dup, result in zip(duplicates, results[200:], strict=True):
            assert result.model_dump() == by_key[dup.action.idempotency_key].model_dump()
        effects_by_key = applied(probe)
        assert set(effects_by_key) == set(keys) and set(effects_by_key.values()) == {1}
        # Executions: one per key, plus at most the actions in flight on the killed
        # worker (its 2 processes); every other duplicate was answered from the record.
        executed = Counter(r["key"] for r in runs(probe))
        assert set(executed) == set(keys)
        assert sum(n - 1 for n in executed.values()) <= 2, executed.most_common(5)
        # The upstream was called again only for what was in flight at the kill.
        calls = Counter(e["key"] for e in read_log(probe / "effect_calls.log"))
        assert sum(n - 1 for n in calls.values()) <= 2
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()


def _result_or_whereabouts(handle: ActionHandle, client: Any) -> ActionResult:
    try:
        return handle.result(timeout=180)
    except ResultTimeout:
        raise AssertionError(
            f"no result for {handle.action_id}: {whereabouts(client, handle._async.id)}"
        ) from None


def test_redis_restart_mid_batch_loses_nothing(
    make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis", appendonly=True)
    url, probe = server.url(0), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe, concurrency=2)
    try:
        client = make_client(url)
        handles = client.submit_many(
            [probe_action("acme", sleep_s=0.05, effect=True) for _ in range(100)]
        )
        wait_for(lambda: len(read_log(probe / "effects.log")) >= 20, 60, "20 effects")
        server.proc.terminate()  # a clean shutdown writes the append-only file
        server.proc.wait(10)
        time.sleep(1.0)
        restarted = _restart(server, tmp_path / "redis")
        results = [h.result(timeout=180) for h in handles]
        assert [r.status for r in results] == ["succeeded"] * 100, [
            r for r in results if r.status != "succeeded"
        ]
        assert set(effects(probe).values()) == {1} and len(effects(probe)) == 100
        assert worker.proc.poll() is None
        # ... and it keeps consuming after the restart.
        after = client.run(probe_action("acme"), timeout=60)
        assert after.status == "succeeded"
        server = restarted
    finally:
        worker.stop()
        server.proc.terminate()
        server.proc.wait(10)


def _restart(old: RedisServer, directory: Path) -> RedisServer:
    return start_redis(directory, appendonly=True, port=old.port)


def test_sigterm_during_a_long_action_finishes_it_and_exits_cleanly(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 5), tmp_path / "probe"
    worker = probe_worker(url, tmp_path / "w", probe, concurrency=1)
    client = make_client(url)
    long = client.submit(probe_action("acme", sleep_s=3, effect=True))
    queued = client.submit(probe_action("acme", effect=True))  # never started here
    wait_for(lambda: len(runs(probe)) == 1, 30, "the long action to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.tail()
    result = long.result(timeout=5)
    assert result.status == "succeeded" and effects(probe)[long.action_id] == 1
    assert not queued.ready()  # back in the queue, not lost: the next worker runs it
    second = probe_worker(url, tmp_path / "w2", probe, concurrency=1)
    try:
        assert queued.result(timeout=60).status == "succeeded"
        assert effects(probe)[queued.action_id] == 1
    finally:
        second.stop()


def test_idempotency_record_survives_and_lease_lapses(redis_own: RedisServer) -> None:
    """The store on its own: a dead holder's claim lapses; completion is kept."""
    r = redis_own.client(6)
    r.flushdb()
    store = IdempotencyStore(r, lease_s=0.3, retention_s=60)
    key = store.key("t", "k")
    assert store.claim(key, "a").state == "claimed"
    busy = store.claim(key, "b")
    assert busy.state == "busy" and 0 < busy.wait_s <= 0.3
    time.sleep(0.4)  # holder "a" died: never renewed
    assert store.claim(key, "b").state == "claimed"
    assert not store.complete(key, "a", {"late": True})  # a's result must not win
    assert store.complete(key, "b", {"status": "succeeded"})
    done = store.claim(key, "c")
    assert done.state == "completed" and done.result == {"status": "succeeded"}
