"""examples/agent_loop.py, run as a user would, against a real files worker: the scripted
model's calls become actions of the example's tenant, the bad call comes back as a tool
error naming the argument, and the files really are in the workspace."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, RedisServer, Worker, start_worker, worker_env

DB = 1  # this module's own Redis database


@pytest.fixture(scope="module")
def files_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Worker]]:
    redis_server.client(DB).flushdb()
    home = tmp_path_factory.mktemp("example-loop")
    url = redis_server.url(DB)
    worker = start_worker(
        url, home, queues="actions.files", concurrency=1, workspace_root=str(home / "ws")
    )
    yield url, home / "ws", worker
    worker.stop()


def test_the_example_agent_loop_runs_against_the_fleet(
    files_worker: tuple[str, Path, Worker], tmp_path: Path
) -> None:
    url, workspace, _ = files_worker
    env = worker_env(url, tmp_path) | {"EXAMPLE_TENANT": "acme"}
    out = subprocess.run(
        [sys.executable, "examples/agent_loop.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    messages = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert messages[-1]["role"] == "assistant"
    final = messages[-1]["content"][0]["text"]
    assert final == "Done: 4 tool calls, 1 refused or failed.", final
    assert (workspace / "acme" / "notes" / "plan.txt").read_text() == "1. measure\n2. report\n"
    assert '"is_error": true' in out.stdout and "op:" in out.stdout
