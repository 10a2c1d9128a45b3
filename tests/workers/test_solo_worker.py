"""`actionfleet worker --pool solo`: actions run in the worker process itself. A real
redis-server and a real worker started through the CLI, as an operator starts one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit.config import STREAM
from producer.client import ActionClient
from tests.conftest import RedisServer, Worker, wait_for_worker, worker_env
from tests.conftest import cli_process as cli

DB = 8  # this module's own Redis database


def files(**payload: Any) -> dict[str, Any]:
    return {"primitive": "files", "tenant_id": "acme", "agent_id": "solo", "payload": payload}


def test_solo_refuses_more_than_one_slot(tmp_path: Path) -> None:
    env = worker_env("redis://127.0.0.1:1/0", tmp_path)
    proc = cli(env, "worker", "--queues", "files", "--pool", "solo", "--concurrency", "2")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert b"--pool solo runs one action at a time" in out
    assert b"--concurrency 2" in out


def test_solo_for_long_actions_warns_before_the_worker_starts(tmp_path: Path) -> None:
    env = worker_env("redis://127.0.0.1:1/0", tmp_path)
    proc = cli(env, "worker", "--queues", "files,code", "--pool", "solo")
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith(b"warning: --pool solo with code:"), first


def test_a_solo_worker_runs_actions_in_its_own_process_and_flushes_their_audit_at_stop(
    redis_server: RedisServer, tmp_path: Path, make_client: Callable[[str], ActionClient]
) -> None:
    url = redis_server.url(DB)
    r = redis_server.client(DB)
    r.flushdb()
    # Events wait 30 s in the worker's emitter: only its close at shutdown sends them.
    env = worker_env(url, tmp_path, workspace_root=str(tmp_path / "ws"), audit_linger_s="30")
    name = f"solo-{time.monotonic_ns()}@localhost"
    log = tmp_path / "worker.log"
    proc = cli(env, "worker", "--queues", "files", "--pool", "solo", "--name", name,
               stdout=log.open("wb"))  # fmt: skip
    worker = Worker(name, env, log, proc, ["actions.files"])
    try:
        wait_for_worker(worker, url)
        assert worker.pool_pids() == [], "solo: no pool processes"
        client = make_client(url)
        assert client.run(files(op="write", path="a.txt", content="hi"), timeout=60).status == (
            "succeeded"
        )
        handles = client.submit_many(
            [files(op="stat", path="a.txt") for _ in range(40)]
            + [files(op="stat", path="../outside.txt")]
        )
        results = [h.result(timeout=60) for h in handles]
    finally:
        worker.stop()
    assert proc.returncode == 0, worker.tail()
    assert [res.status for res in results] == ["succeeded"] * 40 + ["invalid"]
    assert all(res.output and res.output["size"] == 2 for res in results[:40])
    assert {res.worker for res in results} == {name}

    events = [json.loads(line) for _, f in r.xrange(STREAM) for line in f[b"e"].split(b"\n")]
    finished = {e["action_id"] for e in events if e["stage"] == "finished"}
    assert {res.action_id for res in results} <= finished
    assert not list((tmp_path / "audit-spool").glob("*")), "flushed to Redis, not spooled"
    assert r.hlen("unacked") == 0, "every ack reached Redis before the worker exited"
