"""`actionfleet up / status / batch / down` as a user runs them, in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_POLICY, code_action


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def running_fleet(
    sandbox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes], Path]]:
    import shutil

    from tests.services import require

    require(shutil.which("redis-server") is not None, "redis-server")
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {
        "ACTIONFLEET_HOME": str(home),
        "ACTIONFLEET_POLICY": str(TEST_POLICY),
        "PYTHONPATH": str(ROOT),
    }
    log = (home / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    fleet_file = home / "fleet.json"
    deadline = time.monotonic() + 120
    while not fleet_file.exists():
        assert proc.poll() is None, (home / "up.log").read_text()
        assert time.monotonic() < deadline, (home / "up.log").read_text()
        time.sleep(0.2)
    yield env, proc, home
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)
    log.close()


def test_up_requires_signed_actions_and_keeps_its_key_private(running_fleet) -> None:
    """`up` runs with auth required: an operator key in fleet.json (owner only), and an
    unsigned action is refused without running."""
    from producer.client import ActionClient
    from workers.config import Settings

    _env, _proc, home = running_fleet
    fleet_file = home / "fleet.json"
    assert fleet_file.stat().st_mode & 0o777 == 0o600
    info = json.loads(fleet_file.read_text())
    assert info["auth"] == "required" and info["operator_key"].startswith("afk1_")
    url = info["broker_url"]
    with ActionClient(url, settings=Settings(broker_url=url), key=None) as client:
        client.key = None  # an agent without a key
        refused = client.run(code_action("print('never')"), timeout=90)
    assert refused.status == "denied" and refused.error is not None
    assert refused.error.type == "unauthenticated" and refused.error.details["reason"] == "missing"
    assert "ACTIONFLEET_KEY" in refused.error.message


def test_status_reports_workers_and_queues(running_fleet) -> None:
    env, proc, _home = running_fleet
    out = _cli(env, "status")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["broker"] == "ok"
    assert status["fleet"]["pid"] == proc.pid
    # One worker per primitive with an executor; the code worker serves only its queue.
    assert ["actions.code"] in status["workers"].values(), status["workers"]
    assert status["queues"]["actions.code"] == 0


def test_batch_keeps_input_order_and_summarizes(running_fleet, tmp_path: Path) -> None:
    env, _, _ = running_fleet
    lines = [
        json.dumps(code_action("import time; time.sleep(0.5); print('first')")),
        "{this is not json",
        json.dumps(code_action("print('third')")),
        json.dumps(code_action("print(1)", memory_mb=4096)),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out_file = tmp_path / "out.jsonl"
    out = _cli(env, "batch", str(src), "--out", str(out_file), "--timeout", "90")
    assert out.returncode == 1  # not all succeeded
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["status"] for r in results] == ["succeeded", "invalid", "succeeded", "denied"]
    assert results[0]["output"]["stdout"] == "first\n"
    assert results[2]["output"]["stdout"] == "third\n"
    assert '"total": 4' in out.stderr and '"succeeded": 2' in out.stderr


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _wait_rows(env: dict[str, str], sql: str, want: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        out = _cli(env, "audit", "sql", sql)
        if out.returncode == 0:
            rows = _jsonl(out.stdout)
            if len(rows) >= want:
                return rows
        time.sleep(0.5)
    raise AssertionError(f"{sql!r}: wanted {want} rows, got {rows}")


def test_every_stage_of_real_actions_lands_in_clickhouse(running_fleet) -> None:
    """Through the real fleet: worker -> Redis stream -> ingester -> chDB, queried by the
    CLI while the ingester holds the embedded store."""
    from producer.client import ActionClient
    from workers.config import Settings

    env, _, home = running_fleet
    info = json.loads((home / "fleet.json").read_text())
    url = info["broker_url"]
    cases = {
        "succeeded": code_action("print('audited')"),
        "failed": code_action("x = bytearray(400 * 1024 * 1024)", memory_mb=64),
        "denied": code_action("print(1)", memory_mb=4096),
        "timed_out": code_action("while True: pass", timeout_s=1),
    }
    # `up` requires signed actions by default: this client signs with the operator key.
    key = info["operator_key"]
    with ActionClient(url, settings=Settings(broker_url=url), key=key) as client:
        results = {name: client.run(a, timeout=90) for name, a in cases.items()}
    assert {k: r.status for k, r in results.items()} == {k: k for k in cases}

    expected_stages = {
        "succeeded": ["received", "policy", "started", "finished"],
        "failed": ["received", "policy", "started", "finished"],
        "timed_out": ["received", "policy", "started", "finished"],
        "denied": ["received", "policy", "finished"],
    }
    ids = ", ".join(f"'{r.action_id}'" for r in results.values())
    _wait_rows(
        env,
        f"SELECT action_id FROM actionfleet.action_results WHERE action_id IN ({ids})",
        len(results),
    )
    for name, result in results.items():
        out = _cli(env, "audit", "trace", result.action_id)
        assert out.returncode == 0, out.stderr
        trace = _jsonl(out.stdout)
        assert [row["stage"] for row in trace] == expected_stages[name], trace
        assert {row["key_id"] for row in trace} == {info["operator_key_id"]}, trace
        assert {row["tenant_id"] for row in trace} == {"acme"}
        finished = trace[-1]
        assert finished["status"] == result.status
        assert finished["duration_ms"] == result.duration_ms
        if result.error is not None:
            assert finished["error_type"] == result.error.type
    # The months the actions finished in (two if the run straddled a month's end).
    months = {r.finished_at.astimezone(UTC).strftime("%Y-%m") for r in results.values()}
    counted = 0
    for month in sorted(months):
        usage = _jsonl(_cli(env, "audit", "report", "usage", "--month", month).stdout)
        acme = [r for r in usage if r["tenant_id"] == "acme" and r["primitive"] == "code"]
        counted += sum(r["actions"] for r in acme)
    assert counted >= len(results)


def test_down_stops_the_fleet(running_fleet) -> None:
    env, proc, home = running_fleet
    out = _cli(env, "down")
    assert out.returncode == 0, out.stderr
    assert proc.wait(30) == 0
    assert not (home / "fleet.json").exists()
    assert _cli(env, "status").returncode != 0
    assert _cli(env, "down").returncode != 0  # nothing left to stop
