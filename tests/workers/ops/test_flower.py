"""Flower from `actionfleet up --flower`, driven in a real browser.

A real fleet (`actionfleet up` subprocess: Redis, one worker per primitive with an executor,
the ingester, Flower, the metrics endpoint), Debian's Chromium through Playwright. The test
logs in with basic auth, sees the five per-primitive queues and the online workers, submits
a code action and sees its task succeed; screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from producer.client import ActionClient
from producer.models import PRIMITIVES, queue_for
from producer.transport import task_id_for
from tests.conftest import (
    ROOT,
    TEST_POLICY,
    RedisServer,
    Worker,
    code_action,
    http_status,
    start_worker,
)
from tests.services import require
from workers.browser.manager import BASE_ARGS
from workers.config import Settings
from workers.ops.flower import flower_argv, flower_auth, flower_env

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "flower-test-pw-1234"


@dataclass
class UpFleet:
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    broker_url: str
    log: Path
    extra_worker: Worker | None


def _wait_fleet_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"actionfleet up exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.3)
    pytest.fail(f"no fleet.json after 150 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def up_fleet(
    redis_server: RedisServer, sandbox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UpFleet]:
    home = tmp_path_factory.mktemp("flower-home")
    url = redis_server.url(9)
    redis_server.client(9).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONFLEET_", "FLOWER_"))}
    env |= {
        "ACTIONFLEET_HOME": str(home),
        "ACTIONFLEET_BROKER_URL": url,
        "ACTIONFLEET_POLICY": str(TEST_POLICY),
        "ACTIONFLEET_FLOWER_USER": "ops",
        "ACTIONFLEET_FLOWER_PASSWORD": PASSWORD,
        "ACTIONFLEET_AUTH": "off",  # Flower is the subject here; `up`'s auth: test_cli_fleet
        "PYTHONPATH": str(ROOT),
    }
    log = home / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "up", "--flower", "--no-image"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    extra: Worker | None = None
    try:
        info = _wait_fleet_file(home / "fleet.json", proc, log)
        # Queues of primitives without an executor yet: served by a plain worker, so the
        # dashboard shows all five either way.
        missing = [p for p in PRIMITIVES if p not in info["primitives"]]
        if missing:
            queues = ",".join(queue_for(p) for p in missing)
            extra = start_worker(url, home / "extra", queues=queues, concurrency=1)
        yield UpFleet(proc, info, url, log, extra)
    finally:
        if extra is not None:
            extra.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_status(url: str, auth: tuple[str, str] | None, want: int) -> int:
    deadline, status = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        try:
            status = http_status(url, auth)
        except OSError:
            status = 0  # not listening yet
        if status == want:
            break
        time.sleep(0.3)
    return status


def test_fleet_file_records_flower_and_metrics(up_fleet: UpFleet) -> None:
    flower = up_fleet.info["flower"]
    assert flower["url"].startswith("http://127.0.0.1:") and flower["user"] == "ops"
    assert "password" not in json.dumps(up_fleet.info).lower()  # never written to disk
    metrics = up_fleet.info["metrics"]["url"]
    assert metrics.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(metrics, timeout=10) as resp:
        assert "actionfleet_broker_up 1.0" in resp.read().decode()


def test_flower_refuses_without_credentials(up_fleet: UpFleet) -> None:
    url = up_fleet.info["flower"]["url"]
    assert _wait_status(url, ("ops", PASSWORD), 200) == 200
    assert http_status(url) == 401
    assert http_status(url, ("ops", "wrong-password")) == 401
    assert http_status(url + "api/workers") == 401


def test_browser_sees_queues_workers_and_a_succeeded_task(up_fleet: UpFleet) -> None:
    require(CHROMIUM.exists(), "Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    base = up_fleet.info["flower"]["url"]
    assert _wait_status(base, ("ops", PASSWORD), 200) == 200
    ARTIFACTS.mkdir(exist_ok=True)
    args = [*BASE_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    worker_names = [w["name"] for w in up_fleet.info["workers"]]
    if up_fleet.extra_worker is not None:
        worker_names.append(up_fleet.extra_worker.name)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args, headless=True)
        try:
            context = browser.new_context(
                http_credentials={"username": "ops", "password": PASSWORD},
                viewport={"width": 1400, "height": 1000},
            )
            page = context.new_page()

            # Workers: every node of the fleet shows as online.
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                page.goto(base + "workers", wait_until="networkidle")
                text = page.inner_text("body")
                # The table wraps long names over lines: compare without whitespace.
                flat = "".join(text.split())
                online = text.count("\tOnline\t")
                if all(n in flat for n in worker_names) and online >= len(worker_names):
                    break
                time.sleep(1)
            for n in worker_names:
                assert n in flat, (n, text)
            assert online >= len(worker_names), text
            page.screenshot(path=str(ARTIFACTS / "flower-workers.png"), full_page=True)

            # Broker: the five per-primitive queues.
            page.goto(base + "broker", wait_until="networkidle")
            flat = "".join(page.inner_text("body").split())
            for p in PRIMITIVES:
                assert queue_for(p) in flat, (p, flat)
            page.screenshot(path=str(ARTIFACTS / "flower-broker.png"), full_page=True)

            # A submitted action's task, seen succeed.
            url = up_fleet.broker_url
            client = ActionClient(url, settings=Settings(broker_url=url))
            try:
                result = client.run(code_action("print('seen by flower')"), timeout=120)
            finally:
                client.close()
            assert result.status == "succeeded", result
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                task_id = task_id_for("acme", result.action_id)  # the Celery task id
                page.goto(base + f"task/{quote(task_id)}", wait_until="networkidle")
                text = page.inner_text("body")
                if "SUCCESS" in text:
                    break
                time.sleep(1)
            assert "SUCCESS" in text, text[:2000]
            assert "run_code" in text or "code" in text
            page.screenshot(path=str(ARTIFACTS / "flower-task.png"), full_page=True)
            assert (ARTIFACTS / "flower-task.png").stat().st_size > 10_000
        finally:
            browser.close()


def test_generated_password_and_no_credentials_in_argv() -> None:
    generated = flower_auth(Settings(flower_password=None))
    assert generated.generated and len(generated.password) >= 20
    assert flower_auth(Settings(flower_password=None)).password != generated.password
    fixed = flower_auth(Settings(flower_user="u", flower_password="p" * 12))  # type: ignore[arg-type]
    assert (fixed.user, fixed.password, fixed.generated) == ("u", "p" * 12, False)
    argv = flower_argv("redis://127.0.0.1:1/0", "127.0.0.1", 5555)
    assert not any(fixed.password in a for a in argv)
    env = flower_env({"FLOWER_BASIC_AUTH": "evil:override", "PATH": "/bin"}, fixed)
    assert env["FLOWER_BASIC_AUTH"] == "u:" + "p" * 12 and env["PATH"] == "/bin"
