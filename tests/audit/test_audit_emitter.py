"""The emitter (``AuditMiddleware``) against real Redis: workers go on while Redis is
down (events spool to disk, then flush), a burst all arrives, and no secret reaches the
stream or any ClickHouse column (real chDB through an in-process ingester).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from audit.config import STREAM
from audit.emitter import AuditMiddleware
from tests.audit_fixtures import (
    SECRETS,
    action,
    drained_ingester,
    make_pipeline,
    redis_for_test,
    run_action,
    stream_events,
    wait_for,
)
from workers.middleware import ActionContext, LifecycleEvent
from workers.ops.fleet import free_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("need_chdb")]


# ------------------------------------------------------------- store unavailable


def test_redis_down_workers_go_on_events_spool_then_flush(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"  # nothing listens yet
    mw = AuditMiddleware(
        url, spool_dir=tmp_path / "spool", max_buffer=50, redis_timeout_s=0.2, close_timeout_s=1
    )
    pipeline = make_pipeline(mw)
    # The action's own thread must never touch the (dead) network: only the emitter's
    # background thread may try. Recorded per thread instead of timed.
    callers: set[int] = set()
    real_connect = socket.socket.connect

    def recording_connect(sock: socket.socket, address: Any) -> None:
        callers.add(threading.get_ident())
        return real_connect(sock, address)

    socket.socket.connect = recording_connect  # type: ignore[method-assign]
    try:
        for _ in range(100):
            assert run_action(pipeline, action("print(1)"))["status"] == "succeeded"
        mw.flush(1)
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]
    assert callers, "the emitter never tried to reach Redis"
    assert threading.get_ident() not in callers, "an action waited on the audit network path"
    mw.close()  # what could not be sent is on disk now
    assert list((tmp_path / "spool").glob("spool-*.jsonl"))
    # Redis comes up on that port; a new emitter (e.g. the restarted worker) replays.
    from tests.conftest import start_redis

    rs = start_redis(tmp_path / "redis", port=port)
    proc = rs.proc
    try:
        mw2 = AuditMiddleware(url, spool_dir=tmp_path / "spool")
        run_action(make_pipeline(mw2), action("print(2)"))
        wait_for(lambda: stream_events(rs.client()) == 404, 30, "the spool to replay")
        mw2.close()
        assert not list((tmp_path / "spool").glob("*.jsonl"))
        rows = [
            json.loads(line) for _, f in rs.client().xrange(STREAM) for line in f[b"e"].split(b"\n")
        ]
        assert len({row["event_id"] for row in rows}) == 404  # nothing duplicated
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_burst_of_events_all_reach_the_stream(tmp_path: Path) -> None:
    """5,000 events emitted back to back all arrive (the per-event cost is measured by
    benchmarks/audit_ingest.py, not asserted here)."""
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        pipeline = make_pipeline(mw)
        ctx = ActionContext(
            primitive="code", queue="actions.code", worker="w", attempt=1, raw=action("print(1)")
        )
        pipeline.run(ctx)  # a real context with a parsed action
        n = 5_000
        events = [LifecycleEvent(stage="started", ctx=ctx, time=datetime.now(UTC))] * n
        for ev in events:
            mw.on_event(ev)
        assert mw.flush(30)
        assert stream_events(rs.client()) == n + 4
        mw.close()


# ---------------------------------------------------------------------- secrets


def test_secret_never_reaches_any_clickhouse_column(tmp_path: Path) -> None:
    secret = SECRETS["github"]
    spellings = [secret, base64.b64encode(secret.encode()).decode().rstrip("=")]
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        pipeline = make_pipeline(mw)
        raw = action("leak:github")
        raw["labels"] = {"api_token": "label-secret-value", "team": "blue"}
        result = run_action(pipeline, raw)
        assert secret in json.dumps(result)  # the agent's own result is not the audit trail
        assert mw.flush(10)
        stream_text = b"".join(f[b"e"] for _, f in rs.client().xrange(STREAM)).decode()
        for s in spellings:
            assert s not in stream_text
        mw.close()
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
            db = ingester.client
            for table in ("audit_events", "action_results"):
                text = json.dumps(
                    db.query(f"SELECT * FROM actionfleet.{table}").result_rows, default=str
                )
                assert "[REDACTED]" in text
                for s in [*spellings, "label-secret-value"]:
                    assert s not in text, f"{s!r} found in {table}"
            msg = db.query("SELECT error_message FROM actionfleet.action_results").result_rows
            assert msg == [("upstream said: bad credentials [REDACTED]",)]
