"""Streaming batches against a real fleet: redis-server, Celery worker subprocesses (files
worker with signatures required; probe workers for the worker-kill test), the batch
command as a subprocess (SIGKILLed mid-run), and the audit trail counted in real chDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from audit.store import ClientReader
from producer.batch import batch_action_id, batch_idempotency_key
from producer.client import ActionClient
from producer.journal import Journal
from tests.audit_fixtures import chdb_available, drain
from tests.conftest import ROOT, RedisServer, Worker, start_worker
from tests.reliability_fixtures import applied, fresh_url, probe_action, probe_worker, runs
from workers.auth.keys import KeyStore
from workers.config import Settings
from workers.executors.probe import read_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N = 10_000
SIZES = 100  # stat targets: s/0.txt .. s/99.txt, file k holding k bytes
BAD_LINE = 4_321  # this input line is not JSON


@pytest.fixture(scope="module")
def fleet(
    redis_own: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str], Worker]]:
    """A files worker that requires signatures, and the environment of a producer with
    its own key (what ``actionfleet batch`` runs with)."""
    home = tmp_path_factory.mktemp("batch-fleet")
    url = fresh_url(redis_own, 1)
    worker = start_worker(
        url,
        home,
        queues="actions.files",
        concurrency=2,
        auth="required",
        workspace_root=str(home / "ws"),
    )
    _, key = KeyStore(redis.Redis.from_url(url)).create("bench", "*", ["files"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {
        "ACTIONFLEET_BROKER_URL": url,
        "ACTIONFLEET_HOME": str(home / "producer"),
        "ACTIONFLEET_KEY": key.secret(),
        "PYTHONPATH": str(ROOT),
    }
    with ActionClient(url, settings=Settings(broker_url=url), key=key.secret()) as client:
        for k in range(SIZES):
            result = client.run(_files(op="write", path=f"s/{k}.txt", content="x" * k), 60)
            assert result.status == "succeeded", result
    yield url, env, worker
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()


def _files(**payload: Any) -> dict[str, Any]:
    return {"primitive": "files", "tenant_id": "bench", "agent_id": "batch", "payload": payload}


def _input(path: Path, n: int = N) -> Path:
    with path.open("w") as fh:
        for line in range(1, n + 1):
            if line == BAD_LINE:
                fh.write("{this is not json\n")
            else:
                fh.write(json.dumps(_files(op="stat", path=f"s/{line % SIZES}.txt")) + "\n")
    return path


def _batch(env: dict[str, str], *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "batch", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _summary(stderr: str) -> dict[str, Any]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("summary: "))
    return json.loads(line.removeprefix("summary: "))


def _check_in_order(results: list[dict[str, Any]], batch_id: str, n: int = N) -> None:
    """Line i's result is line i's action: its derived id, and the file it stats."""
    assert len(results) == n
    for line, result in enumerate(results, 1):
        if line == BAD_LINE:
            assert result["status"] == "invalid", result
            assert result["error"]["type"] == "validation_error"
            continue
        assert result["action_id"] == batch_action_id(batch_id, line), (line, result)
        assert result["status"] == "succeeded", (line, result)
        assert result["output"]["path"] == f"s/{line % SIZES}.txt", (line, result)
        assert result["output"]["size"] == line % SIZES


def _audit_runs(url: str, store: Path, action_ids: set[str]) -> Counter[str]:
    """How many times each action ran (``action_results`` rows: executed, not answered
    from an idempotency record), from the real audit store, once every finished event of
    ``action_ids`` is in."""
    from audit.ingester import Ingester

    ingester = Ingester(url, f"chdb://{store}", batch_age_s=0.1, serve_queries=False)
    try:
        deadline, seen = time.monotonic() + 180, Counter[str]()
        while time.monotonic() < deadline:
            drain(ingester, timeout=120)
            rows = (
                ClientReader(ingester.client, own=False)
                .query(
                    "SELECT action_id, count() FROM actionfleet.action_results "
                    "WHERE tenant_id = 'bench' GROUP BY action_id"
                )
                .rows
            )
            seen = Counter({a: int(c) for a, c in rows if a in action_ids})
            if set(seen) >= action_ids:
                return seen
            time.sleep(0.5)
        missing = len(action_ids - set(seen))
        raise AssertionError(f"{missing} actions never reached the audit store")
    finally:
        ingester.close()


def test_ten_thousand_actions_in_order_twice_with_the_same_output(
    fleet: tuple[str, dict[str, str], Worker], tmp_path: Path
) -> None:
    _, env, _ = fleet
    src = _input(tmp_path / "in.jsonl")
    outputs = []
    for run in (1, 2):
        out = tmp_path / f"out{run}.jsonl"
        code, err = _finish(_batch(env, str(src), "--out", str(out), "--window", "800"))
        assert code == 1, err  # one invalid line
        summary = _summary(err)
        assert summary["total"] == N and summary["succeeded"] == N - 1, summary
        assert summary["invalid"] == 1 and summary["error_types"] == {"validation_error": 1}
        assert summary["sent"] == N - 1 and summary["resent"] == 0, summary
        results = [json.loads(line) for line in out.read_text().splitlines()]
        _check_in_order(results, summary["batch_id"])
        assert Journal.load(Journal.path_for(out)).finished
        outputs.append(results)
    # Two batches (two batch ids), the same result on every line.
    first, second = ([(r["status"], r["output"]) for r in o] for o in outputs)
    assert first == second
    assert outputs[0][0]["action_id"] != outputs[1][0]["action_id"]


def test_batch_sigkilled_halfway_then_resumed_runs_every_action_once(
    fleet: tuple[str, dict[str, str], Worker], tmp_path: Path
) -> None:
    chdb_available()
    url, env, _ = fleet
    src = _input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    journal = Journal.path_for(out)
    proc = _batch(env, str(src), "--out", str(out), "--window", "500")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and Journal.load(journal).checkpoint.results >= N // 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    state = Journal.load(journal)
    assert not state.finished and N // 2 <= state.checkpoint.results < N, state

    # Without --resume an unfinished batch is refused: nothing is sent again by mistake.
    code, err = _finish(_batch(env, str(src), "--out", str(out)))
    assert code == 2 and "--resume" in err, err

    code, err = _finish(_batch(env, str(src), "--out", str(out), "--resume"))
    assert code == 1, err  # the invalid line
    summary = _summary(err)
    assert summary["batch_id"] == state.batch_id
    assert summary["total"] == N and summary["succeeded"] == N - 1, summary
    assert summary["earlier"] == state.checkpoint.results
    # Lines past the write-ahead mark had never been sent; the resumed run sent each of
    # them once, and looked up (reused) or re-sent only what the killed run had in flight.
    invalid_now = int(state.checkpoint.next_line <= BAD_LINE)
    assert summary["sent"] + summary["reused"] + summary["earlier"] + invalid_now == N, summary
    assert summary["resent"] <= 500 + 256, summary
    results = [json.loads(line) for line in out.read_text().splitlines()]
    _check_in_order(results, state.batch_id)
    ids = {r["action_id"] for r in results if r["status"] == "succeeded"}
    assert len(ids) == N - 1

    # Every action ran exactly once, counted from the audit store.
    counts = _audit_runs(url, tmp_path / "audit", ids)
    assert set(counts.values()) == {1}, counts.most_common(3)


def test_a_worker_sigkilled_during_a_batch_loses_nothing_and_runs_nothing_twice(
    redis_own: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    url, probe = fresh_url(redis_own, 2), tmp_path / "probe"
    settings = {"lease_s": "2", "visibility_timeout_s": "5"}
    doomed = probe_worker(url, tmp_path / "a", probe, concurrency=2, **settings)
    survivor = probe_worker(url, tmp_path / "b", probe, concurrency=2, **settings)
    try:
        client = make_client(url)
        batch_id = f"kill-{os.getpid()}"
        actions = [probe_action("acme", sleep_s=0.02, effect=True) for _ in range(400)]
        results = []
        for result in client.batch(actions, window=100, batch_id=batch_id, timeout=180):
            results.append(result)
            if len(results) == 60:  # mid-batch: kill one worker and its pool processes
                for pid in [*doomed.pool_pids(), doomed.proc.pid]:
                    subprocess.run(["kill", "-9", str(pid)], check=False)
                doomed.proc.wait(10)
        assert [r.status for r in results] == ["succeeded"] * 400
        assert [r.action_id for r in results] == [
            batch_action_id(batch_id, line) for line in range(1, 401)
        ]
        keys = {batch_idempotency_key(batch_id, line) for line in range(1, 401)}
        effects = applied(probe)
        assert set(effects) == keys and set(effects.values()) == {1}
        # Executions: one per action, plus at most what the killed worker had in flight
        # (its 2 processes), which was interrupted before its effect and ran again.
        executed = Counter(r["key"] for r in runs(probe))
        assert set(executed) == keys
        assert sum(n - 1 for n in executed.values()) <= 2, executed.most_common(5)
        calls = Counter(e["key"] for e in read_log(probe / "effect_calls.log"))
        assert sum(n - 1 for n in calls.values()) <= 2
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()


def test_resume_refuses_a_changed_input_and_a_missing_journal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {"PYTHONPATH": str(ROOT), "ACTIONFLEET_HOME": str(tmp_path / "home")}
    src = _input(tmp_path / "in.jsonl", n=3)
    out = tmp_path / "out.jsonl"
    code, err = _finish(_batch(env, str(src), "--out", str(out), "--resume"))
    assert code == 2 and "nothing to resume" in err, err
    Journal.create(
        Journal.path_for(out),
        batch_id="b1",
        input_path=src,
        input_sha256="0" * 64,
        input_lines=3,
    ).close()
    code, err = _finish(_batch(env, str(src), "--out", str(out), "--resume"))
    assert code == 2 and "changed since batch b1" in err, err
    code, err = _finish(_batch(env, str(src), "--out", str(out)))
    assert code == 2 and "unfinished batch b1" in err and "--restart" in err, err


def test_a_torn_last_journal_line_is_ignored(tmp_path: Path) -> None:
    src = _input(tmp_path / "in.jsonl", n=3)
    path = tmp_path / "out.jsonl.journal"
    journal = Journal.create(
        path, batch_id="b2", input_path=src, input_sha256="1" * 64, input_lines=3
    )
    journal.sending(257)
    journal.close()
    with path.open("a") as fh:
        fh.write('{"results": 2, "out_by')  # a crash mid-write
    state = Journal.load(path)
    assert (state.batch_id, state.sending, state.checkpoint.results) == ("b2", 257, 0)
