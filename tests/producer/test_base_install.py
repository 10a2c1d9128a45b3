"""The agent's install: the base distribution alone (no extras) in a fresh virtualenv.

It must give a working producer SDK and the agent's commands (``submit``, ``schema``)
against a real fleet, pull no module of the worker side into an agent process, and turn
an operator command into a clear error naming what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.models import action_json_schema
from tests.conftest import ROOT, RedisServer, Worker, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DB = 2  # this module's own Redis database
EXTRAS_ONLY = ("docker", "playwright", "chdb", "clickhouse_connect", "httpx", "yaml")


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install actionfleet`` (no extras) from a copy of the tree
    (an in-tree build would leave build/ and egg-info behind in the checkout)."""
    tmp = tmp_path_factory.mktemp("base-install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("producer", "workers", "sandboxes", "audit"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("*.pyc"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONFLEET_", "PYTHON"))}
    return env | extra


def _run(venv: Path, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A command of the venv, from a directory outside the checkout (so the installed
    distribution is what gets imported)."""
    exe = argv[0] if argv[0].startswith("/") else str(venv / "bin" / argv[0])
    return subprocess.run(
        [exe, *argv[1:]], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def test_the_base_install_has_no_extras_and_its_producer_loads_nothing_else(
    base_venv: Path, tmp_path: Path
) -> None:
    probe = (
        "import importlib.util, json, sys\n"
        "from producer.client import ActionClient\n"
        "import producer, producer.cli, producer.models, producer.errors, producer.transport\n"
        "foreign = sorted(m for m in sys.modules\n"
        "                 if m.split('.')[0] in ('workers', 'sandboxes', 'audit'))\n"
        f"extras = [m for m in {EXTRAS_ONLY!r} if importlib.util.find_spec(m)]\n"
        "print(json.dumps({'foreign': foreign, 'extras': extras,\n"
        "                  'from': producer.__file__, 'client': ActionClient.__name__}))\n"
    )
    out = _run(base_venv, "python", "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["extras"] == [], "the base install pulled in an extra's package"
    assert seen["foreign"] == [], "importing producer loaded the worker side"
    assert seen["from"].startswith(str(base_venv)) and seen["client"] == "ActionClient"


def test_schema_from_the_base_install(base_venv: Path, tmp_path: Path) -> None:
    out = _run(base_venv, "actionfleet", "schema", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(action_json_schema()))


@pytest.fixture(scope="module")
def files_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("base-install-fleet")
    url = redis_server.url(DB)
    worker: Worker = start_worker(
        url, home, queues="actions.files", concurrency=1, workspace_root=str(home / "ws")
    )
    yield url, home / "ws"
    worker.stop()


def test_submit_from_the_base_install_reaches_a_real_worker(
    base_venv: Path, files_worker: tuple[str, Path], tmp_path: Path
) -> None:
    url, workspace = files_worker
    action = {
        "primitive": "files",
        "tenant_id": "acme",
        "agent_id": "base-install",
        "payload": {"op": "write", "path": "from-agent.txt", "content": "hello"},
    }
    out = _run(
        base_venv,
        "actionfleet",
        "submit",
        json.dumps(action),
        "--timeout",
        "60",
        cwd=tmp_path,
        ACTIONFLEET_BROKER_URL=url,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded", result
    assert (workspace / "acme" / "from-agent.txt").read_text() == "hello"

    # Invalid input: exit 2 with the field named, nothing sent.
    bad = dict(action, payload={"op": "explode", "path": "x.txt"})
    out = _run(base_venv, "actionfleet", "submit", json.dumps(bad), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "payload" in out.stderr and json.loads(out.stdout)["status"] == "invalid"


def test_an_operator_command_on_the_base_install_says_what_is_missing(
    base_venv: Path, tmp_path: Path
) -> None:
    out = _run(base_venv, "actionfleet", "sandbox", "reap", cwd=tmp_path)
    assert out.returncode == 1
    assert "needs 'docker'" in out.stderr and "actionfleet[all]" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
