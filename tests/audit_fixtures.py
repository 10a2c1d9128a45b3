"""Shared pieces for the audit tests: a real pipeline feeding the real AuditMiddleware.

The pipeline, policy engine, ActionContext and ActionResult are the production ones; only
the executor is scripted (no Docker here): the action's ``source`` says what happens, so a
test can make an action succeed, fail, time out or leak a secret on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from audit.config import DEAD_STREAM, GROUP, STREAM
from audit.emitter import AuditMiddleware
from audit.ingester import Ingester
from audit.store import RemoteReader
from producer.errors import ActionTimeout, ResourceExhausted
from tests.conftest import TEST_POLICY, RedisServer, start_redis
from tests.services import require
from workers.middleware import ActionContext
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "ROOT",
    "SECRETS",
    "STREAM_KEYS",
    "IngesterProcess",
    "ScriptedExecutor",
    "action",
    "chdb_available",
    "drain",
    "emit_actions",
    "endpoint",
    "make_pipeline",
    "need_chdb",
    "redis_for_test",
    "remote",
    "run_action",
    "scalar",
    "stream_events",
    "wait_for",
]


def chdb_available() -> None:
    try:
        import chdb  # noqa: F401
        import clickhouse_connect  # noqa: F401
    except ImportError:
        require(False, "chdb + clickhouse-connect (pip install actionfleet[audit])")


@pytest.fixture
def need_chdb() -> None:
    """Every audit test module uses this: skip (locally) or fail (CI) without chDB."""
    chdb_available()


SECRETS = {"github": "ghp_S3cr3tValue-that-must-never-be-stored"}


class ScriptedExecutor:
    """Does what the action's source says: ok, fail, timeout, crash, leak:<secret>."""

    primitive = "code"

    def execute(self, action: Any, grant: Any, ctx: ActionContext) -> dict[str, Any]:
        src = action.payload.source
        ctx.sandbox_id = "sbx-" + action.action_id[:8]
        usage = {"wall_ms": 5, "cpu_user_s": 0.25, "cpu_system_s": 0.05, "max_rss_kb": 2048}
        if src.startswith("leak:"):
            # Resolve a secret by reference (never in the message), register it as
            # executors do, and let it leak into the output and the error message.
            secret = SECRETS[src.split(":", 1)[1]]
            ctx.extra.setdefault("secrets", []).append(secret)
            raise ResourceExhausted(
                f"upstream said: bad credentials {secret}",
                output={"stdout": f"token={secret}\n", "stderr": "", "usage": usage},
            )
        if src == "timeout":
            raise ActionTimeout(
                "the program ran longer than its 1s timeout and was killed",
                output={"stdout": "partial", "stderr": "", "usage": usage},
                retryable=False,
            )
        if src == "fail":
            raise ResourceExhausted("the program used more than 64 MB and was killed")
        if src == "crash":
            raise RuntimeError("bug in the executor")
        return {"exit_code": 0, "stdout": src, "stderr": "", "usage": usage}

    def close(self) -> None:
        pass


class _Registry:
    def __init__(self) -> None:
        self.executor = ScriptedExecutor()

    def supports(self, primitive: str) -> bool:
        return primitive == "code"

    def get(self, primitive: str) -> ScriptedExecutor:
        return self.executor

    def close(self) -> None:
        pass


def make_pipeline(middleware: AuditMiddleware) -> Pipeline:
    return Pipeline(PolicyEngine(TEST_POLICY), _Registry(), [middleware])  # type: ignore[arg-type]


def action(source: str = "ok", tenant: str = "acme", **payload: Any) -> dict[str, Any]:
    return {
        "primitive": "code",
        "tenant_id": tenant,
        "agent_id": "tester",
        "user_id": "u-1",
        "action_id": str(uuid.uuid4()),
        "labels": {"suite": "audit"},
        "payload": {"language": "python", "source": source, **payload},
    }


def run_action(pipeline: Pipeline, raw: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    ctx = ActionContext(
        primitive=str(raw.get("primitive", "code")),
        queue="actions.code",
        worker="test-worker@localhost",
        attempt=attempt,
        raw=raw,
    )
    return pipeline.run(ctx)


@dataclass
class IngesterProcess:
    """``python -m audit.cli audit ingest`` as a real subprocess (killable with SIGKILL)."""

    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, redis_url: str, dsn: str, log: Path, *extra: str) -> IngesterProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
        env["PYTHONPATH"] = str(ROOT)
        argv = [sys.executable, "-m", "audit.cli", "audit", "ingest"]
        argv += ["--broker", redis_url, "--dsn", dsn, *extra]
        out = log.open("ab")
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return cls(proc, log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode or 0)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextmanager
def redis_for_test(tmp: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp)
    try:
        yield server
    finally:
        server.proc.terminate()
        server.proc.wait(10)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def endpoint(dsn_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dsn_path / "actionfleet-query.json").read_text())
    except (OSError, ValueError):
        return None


STREAM_KEYS = {"stream": STREAM, "group": GROUP, "dead": DEAD_STREAM}


# ---------------------------------------------------------------- shared by the test modules


def emit_actions(redis_url: str, spool: Path, n: int, tenant: str = "acme") -> list[str]:
    """Runs ``n`` actions (every 7th fails) through the real pipeline; their action ids."""
    mw = AuditMiddleware(redis_url, spool_dir=spool)
    pipeline = make_pipeline(mw)
    ids = []
    for i in range(n):
        raw = action("fail" if i % 7 == 0 else f"print({i})", tenant=tenant)
        run_action(pipeline, raw)
        ids.append(raw["action_id"])
    assert mw.flush(30)
    mw.close()
    return ids


def drain(ingester: Ingester, timeout: float = 30) -> None:
    """Step an in-process ingester until the stream is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ingester.run_once()
        if ingester.lag() == {"stream_length": 0, "pending": 0} and not ingester._buf:
            return
    pytest.fail(f"stream not drained: {ingester.lag()} {ingester.stats}")


@contextmanager
def drained_ingester(url: str, store: Path, **options: Any) -> Iterator[Ingester]:
    """An in-process ingester writing to the chDB store at ``store``, stepped until the
    stream is empty, closed afterwards."""
    ingester = Ingester(url, f"chdb://{store}", batch_age_s=0.1, serve_queries=False, **options)
    try:
        drain(ingester)
        yield ingester
    finally:
        ingester.close()


def remote(store: Path, ingester: IngesterProcess) -> RemoteReader:
    """The query endpoint of that ingester process (not a stale file of a killed one)."""

    def current() -> dict[str, Any] | None:
        info = endpoint(store)
        return info if info and info["pid"] == ingester.proc.pid else None

    info = wait_for(current, 60, "the ingester's query endpoint")
    return RemoteReader(info["url"], info["token"])


def stream_events(r: redis.Redis) -> int:
    """Events waiting in the stream (an entry packs one or more, one per line)."""
    return sum(f[b"e"].count(b"\n") + 1 for _, f in r.xrange(STREAM) if b"e" in f)


def scalar(reader: Any, sql: str) -> Any:
    return reader.query(sql).rows[0][0]


def stream_rows(redis_url: str, action_id: str) -> list[dict[str, Any]]:
    """The audit events of one action still in the Redis stream (not yet ingested)."""
    client = redis.Redis.from_url(redis_url)
    try:
        rows = []
        for _, fields in client.xrange(STREAM):
            for line in fields[b"e"].split(b"\n"):
                row = json.loads(line)
                if row["action_id"] == action_id:
                    rows.append(row)
        return rows
    finally:
        client.close()
