"""Shared fixtures: a real redis-server per session and real Celery worker subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import ActionClient
from tests.services import require
from workers.config import Settings
from workers.ops.fleet import celery_worker_argv, free_port, redis_argv

pytest_plugins = [
    "tests.fixtures_docker",
    "tests.tripwire",
    "tests.reliability_fixtures",
    "tests.browse_fixtures",
    "tests.api_fixtures",
    "tests.audit_fixtures",
    "tests.governance_fixtures",
]

ROOT = Path(__file__).resolve().parent.parent
TEST_POLICY = Path(__file__).parent / "data" / "policy.yaml"


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    dir: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db))


def start_redis(tmp: Path, *, appendonly: bool = False, port: int | None = None) -> RedisServer:
    """A real redis-server on a free loopback port (or ``port``, e.g. to restart one)."""
    exe = shutil.which("redis-server")
    require(exe is not None, "redis-server (Debian package redis-server)")
    assert exe is not None
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    argv = redis_argv(exe, port, tmp, appendonly=appendonly)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, proc, tmp)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if server.client().ping():
                return server
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.proc.terminate()
    server.proc.wait(10)


@dataclass
class Worker:
    """A real ``celery -A workers.app worker`` subprocess."""

    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes]
    queues: list[str] = field(default_factory=list)

    def pool_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return ""


def worker_env(broker_url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {
        "ACTIONFLEET_BROKER_URL": broker_url,
        "ACTIONFLEET_HOME": str(home),
        "ACTIONFLEET_POLICY": str(TEST_POLICY),
        # Tests of a primitive run unsigned actions; the authentication tests (and the
        # `up` tests, which keep its default) require signatures (tests/workers/auth).
        "ACTIONFLEET_AUTH": "off",
        "PYTHONPATH": str(ROOT),
    }
    env |= {f"ACTIONFLEET_{k.upper()}": v for k, v in extra.items()}
    return env


def cli_process(env: dict[str, str], *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """``actionfleet <args>`` as an operator runs it (``worker`` execs into Celery, so the
    process is the worker's main process); output on a pipe unless ``stdout`` is given."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=kw.pop("stdout", subprocess.PIPE),
        stderr=subprocess.STDOUT,
        **kw,
    )


def start_worker(
    broker_url: str,
    home: Path,
    *,
    queues: str = "actions.code",
    concurrency: int = 2,
    name: str | None = None,
    **extra: str,
) -> Worker:
    name = name or f"test-{os.getpid()}-{time.monotonic_ns()}@localhost"
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"{name.split('@')[0]}.log"
    env = worker_env(broker_url, home, **extra)
    argv = [
        *celery_worker_argv(queues, name=name, concurrency=concurrency),
        "--logfile",
        str(log),
    ]
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    worker = Worker(name, env, log, proc, queues.split(","))
    wait_for_worker(worker, broker_url)
    return worker


def wait_for_worker(worker: Worker, broker_url: str, timeout: float = 60) -> None:
    from celery import Celery

    app = Celery(set_as_current=False, broker=broker_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{worker.tail()}")
            if app.control.ping(destination=[worker.name], timeout=0.5):
                return
        raise RuntimeError(f"worker did not answer a ping:\n{worker.tail()}")
    finally:
        app.close()


@pytest.fixture(scope="session")
def make_client() -> Iterator[Callable[[str], ActionClient]]:
    clients: list[ActionClient] = []

    def make(broker_url: str) -> ActionClient:
        client = ActionClient(broker_url, settings=Settings(broker_url=broker_url))
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


# Each program reports whether an earlier run left its marker, then leaves one: a container
# handed to two runs shows up as a non-empty "seen".
MARKER_PROGRAM = """
import json, os, socket
paths = ["/tmp/actionfleet-used", "/work/actionfleet-used"]
seen = [p for p in paths if os.path.exists(p)]
for p in paths:
    open(p, "w").write("used")
pid1 = open("/proc/1/cmdline").read()
print(json.dumps({"seen": seen, "host": socket.gethostname(), "pid1": pid1}))
"""


def code_action(source: str, language: str = "python", **payload: object) -> dict:
    return {
        "primitive": "code",
        "tenant_id": "acme",
        "agent_id": "tester",
        "user_id": "u-1",
        "payload": {"language": language, "source": source, **payload},
    }


def http_status(url: str, auth: tuple[str, str] | None = None, wait_s: float = 0.0) -> int:
    """HTTP status of a GET (with basic auth if given); connection errors are retried for
    ``wait_s`` (a server still starting), then raised."""
    import base64
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + wait_s
    while True:
        req = urllib.request.Request(url)
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
