"""The audit trail against real Redis and real chDB through clickhouse-connect.

Events come from the production pipeline and ``AuditMiddleware`` (only the executor is
scripted, see ``tests/audit_fixtures.py``); ingesters run in-process where the test needs
to step them, and as real subprocesses where the test kills them.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from audit import reports
from audit.config import DEAD_STREAM, GROUP, STREAM
from audit.emitter import AuditMiddleware
from audit.ingester import Ingester
from audit.store import ClientReader, RemoteReader, connect, migrate
from tests.audit_fixtures import (
    ROOT,
    SECRETS,
    IngesterProcess,
    action,
    chdb_available,
    endpoint,
    make_pipeline,
    redis_for_test,
    run_action,
    wait_for,
)
from workers.fleet import free_port
from workers.middleware import ActionContext, LifecycleEvent, Middleware

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def _need_chdb() -> None:
    chdb_available()


def drain(ingester: Ingester, timeout: float = 30) -> None:
    """Step an in-process ingester until the stream is empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ingester.run_once()
        if ingester.lag() == {"stream_length": 0, "pending": 0} and not ingester._buf:
            return
    pytest.fail(f"stream not drained: {ingester.lag()} {ingester.stats}")


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


# ------------------------------------------------------------------------ every stage


def test_every_stage_lands_for_each_outcome(tmp_path: Path) -> None:
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        pipeline = make_pipeline(mw)
        cases = {
            "succeeded": action("print('hi')"),
            "failed": action("fail"),
            "timed_out": action("timeout"),
            "crashed": action("crash"),
            "denied": action("print(1)", memory_mb=4096),  # above the policy ceiling
        }
        results = {name: run_action(pipeline, raw) for name, raw in cases.items()}
        invalid_raw = action("x") | {"colour": "red"}  # unknown field: invalid
        results["invalid"] = run_action(pipeline, invalid_raw)
        cases["invalid"] = invalid_raw
        assert mw.flush(10)
        mw.close()

        ingester = Ingester(
            rs.url(),
            f"chdb://{tmp_path}/store",
            batch_size=50,
            batch_age_s=0.1,
            serve_queries=False,
        )
        try:
            drain(ingester)
            db = ClientReader(ingester.client, own=False)
            expected_stages = {
                "succeeded": ["received", "policy", "started", "finished"],
                "failed": ["received", "policy", "started", "finished"],
                "timed_out": ["received", "policy", "started", "finished"],
                "crashed": ["received", "policy", "started", "finished"],
                "denied": ["received", "policy", "finished"],
                "invalid": ["finished"],  # never parsed, so never "received"
            }
            for name, raw in cases.items():
                result = results[name]
                rows = reports.trace(db, raw["action_id"])
                assert [r["stage"] for r in rows] == expected_stages[name], name
                assert {r["action_id"] for r in rows} == {raw["action_id"]}
                assert {r["tenant_id"] for r in rows} == {"acme"}
                finished = rows[-1]
                assert finished["status"] == result["status"]
                assert finished["duration_ms"] == result["duration_ms"]
                assert finished["error_type"] == ((result["error"] or {}).get("type") or "")
                # durations grow along the stages of one attempt
                durations = [r["duration_ms"] for r in rows]
                assert durations == sorted(durations)
                res = db.query(
                    "SELECT status, duration_ms, tenant_id, attempt FROM "
                    "actionfleet.action_results WHERE action_id = {a:String}",
                    {"a": raw["action_id"]},
                ).rows
                assert res == [[result["status"], result["duration_ms"], "acme", 1]], name
            assert results["timed_out"]["status"] == "timed_out"
            assert results["denied"]["status"] == "denied"
            denied_policy = reports.trace(db, cases["denied"]["action_id"])[1]
            assert denied_policy["policy_decision"] == "deny"
            assert "512MB" in denied_policy["policy_reason"]
            ok = reports.trace(db, cases["succeeded"]["action_id"])
            assert ok[-1]["sandbox_id"].startswith("sbx-")
            assert ok[-1]["cpu_time_ms"] == 300 and ok[-1]["peak_memory_bytes"] == 2048 * 1024
            assert ok[0]["input_preview"] == '{"language":"python","source":"print(\'hi\')"}'
            assert len(ok[0]["input_sha256"]) == 64
            # event ids are time-ordered (UUIDv7)
            ids = [r["event_id"] for r in ok]
            assert ids == sorted(ids)
            versions = db.query("SELECT version FROM actionfleet.schema_migrations").rows
            assert versions == [[1]]
        finally:
            ingester.close()


# ------------------------------------------------------------------- exactly once


def _emit_actions(redis_url: str, spool: Path, n: int, tenant: str = "acme") -> list[str]:
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


def test_ingester_sigkill_mid_batch_every_event_exactly_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        ids = _emit_actions(rs.url(), tmp_path / "spool", 600)
        total = stream_events(r)
        assert total == 600 * 4
        entries = int(r.xlen(STREAM))

        # 1) killed between INSERT and XACK: rows are in ClickHouse, entries still pending.
        first = IngesterProcess.start(
            rs.url(),
            f"chdb://{store}",
            tmp_path / "ing1.log",
            "--batch-size",
            "500",
            "--batch-age",
            "0.2",
            "--pause-after-insert",
            "30",
        )
        try:
            db = remote(store, first)
            wait_for(
                lambda: scalar(db, "SELECT count() FROM actionfleet.audit_events") > 0,
                60,
                "the first batch to be inserted",
            )
            pending = int(r.xpending(STREAM, GROUP)["pending"])
            assert pending > 0, "killed too late: nothing was in flight"
        finally:
            first.kill()
        assert first.proc.returncode == -9

        # 2) a second ingester, killed at an arbitrary moment while draining.
        second = IngesterProcess.start(
            rs.url(),
            f"chdb://{store}",
            tmp_path / "ing2.log",
            "--batch-size",
            "300",
            "--batch-age",
            "0.05",
        )
        try:
            wait_for(lambda: int(r.xlen(STREAM)) < entries, 60, "progress", 0.01)
        finally:
            second.kill()

        # 3) restart: everything present exactly once.
        third = IngesterProcess.start(
            rs.url(),
            f"chdb://{store}",
            tmp_path / "ing3.log",
            "--batch-size",
            "1000",
        )
        try:
            db = remote(store, third)
            wait_for(lambda: int(r.xlen(STREAM)) == 0, 90, "the stream to drain")
            q = "SELECT count(), uniqExact(event_id) FROM actionfleet.audit_events"
            assert db.query(q).rows == [[total, total]], third.tail()
            q = "SELECT count(), uniqExact(action_id) FROM actionfleet.action_results"
            assert db.query(q).rows == [[600, 600]]
            per_action = db.query(
                "SELECT count() c FROM actionfleet.audit_events GROUP BY action_id HAVING c != 4"
            ).rows
            assert per_action == []
            got = {
                row[0]
                for row in db.query("SELECT DISTINCT action_id FROM actionfleet.audit_events").rows
            }
            assert got == set(ids)
            assert int(r.xpending(STREAM, GROUP)["pending"]) == 0
        finally:
            assert third.stop() == 0, third.tail()


# ------------------------------------------------------------- store unavailable


def test_store_locked_then_back_backlog_waits_and_drains(tmp_path: Path) -> None:
    """chDB store held by another process (the lock): workers go on, events wait in the
    stream, and all land once the store can be opened."""
    import clickhouse_connect

    store = tmp_path / "store"
    holder = clickhouse_connect.get_client(interface="chdb", path=str(store))
    holder.command("SELECT 1")
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        ing = IngesterProcess.start(
            rs.url(), f"chdb://{store}", tmp_path / "ing.log", "--batch-age", "0.1"
        )
        try:
            wait_for(lambda: "audit store unavailable" in ing.tail(), 60, "the ingester to try")
            _emit_actions(rs.url(), tmp_path / "spool", 200)  # every action still succeeds
            time.sleep(1.0)
            assert stream_events(r) == 800  # the backlog waits in the stream
            assert ing.proc.poll() is None
            assert holder.query("SHOW DATABASES").result_rows.count(("actionfleet",)) == 0
            holder.close()  # the store comes back
            wait_for(lambda: int(r.xlen(STREAM)) == 0, 90, "the backlog to drain")
            db = remote(store, ing)
            assert scalar(db, "SELECT count() FROM actionfleet.audit_events") == 800
            assert scalar(db, "SELECT count() FROM actionfleet.action_results") == 200
        finally:
            assert ing.stop() == 0, ing.tail()


def test_unreachable_server_dsn_keeps_backlog_then_drains(tmp_path: Path) -> None:
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        ing = IngesterProcess.start(rs.url(), dead, tmp_path / "ing.log", "--batch-age", "0.1")
        try:
            _emit_actions(rs.url(), tmp_path / "spool", 100)
            wait_for(lambda: "audit store unavailable" in ing.tail(), 60, "a store error")
            time.sleep(1.0)
            assert stream_events(r) == 400
            assert ing.proc.poll() is None  # it waits, it does not die
        finally:
            ing.stop()
        # The store returns (here: the configured store is reachable again).
        ingester = Ingester(
            rs.url(), f"chdb://{tmp_path}/store", batch_age_s=0.1, serve_queries=False
        )
        try:
            drain(ingester)
            assert ingester.client.query(
                "SELECT count() FROM actionfleet.audit_events"
            ).result_rows == [(400,)]
        finally:
            ingester.close()


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


# ----------------------------------------------------------------- dead letters


def test_malformed_entries_dead_lettered_and_ingestion_continues(tmp_path: Path) -> None:
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        _emit_actions(rs.url(), tmp_path / "spool", 5)
        good = json.loads(r.xrange(STREAM, count=1)[0][1][b"e"].split(b"\n")[0])
        bad_entries: list[dict[str, Any]] = [
            {"x": "no e field"},
            {"e": "not json at all"},
            {"e": '{"event_id": 1'},
            {
                "e": json.dumps(
                    good
                    | {
                        "event_id": "00000000-0000-0000-0000-000000000000",
                    }
                )
            },
            {"e": json.dumps(good | {"stage": "exploded"})},
            {"e": json.dumps(good | {"attempt": -3})},
            {"e": json.dumps(good).replace("{", "{\n", 1)},  # two lines, neither a row
        ]
        expected_dead = len(bad_entries) + 1
        for fields in bad_entries:
            r.xadd(STREAM, fields)
        _emit_actions(rs.url(), tmp_path / "spool", 5)  # after the bad ones
        ingester = Ingester(
            rs.url(),
            f"chdb://{tmp_path}/store",
            batch_size=1000,
            batch_age_s=0.1,
            serve_queries=False,
        )
        try:
            drain(ingester)
            rows = ingester.client.query("SELECT count() FROM actionfleet.audit_events").result_rows
            assert rows == [(40,)]
            dead = r.xrange(DEAD_STREAM)
            assert len(dead) == expected_dead
            reasons = [d[1][b"reason"].decode() for d in dead]
            assert all(reasons), reasons
            assert any("no 'e' field" in x for x in reasons)
            assert any("stage" in x for x in reasons)
            assert any(b"field:x" in d[1] for d in dead)  # the original entry is kept
            assert any(d[1].get(b"field:e") == b"not json at all" for d in dead)
            assert any(b"payload" in d[1] and b"line" in d[1] for d in dead)  # one bad row
            assert ingester.stats.dead_lettered == expected_dead
            # and it keeps going afterwards
            _emit_actions(rs.url(), tmp_path / "spool", 2)
            drain(ingester)
            rows = ingester.client.query("SELECT count() FROM actionfleet.audit_events").result_rows
            assert rows == [(48,)]
        finally:
            ingester.close()


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
        ingester = Ingester(
            rs.url(), f"chdb://{tmp_path}/store", batch_age_s=0.1, serve_queries=False
        )
        try:
            drain(ingester)
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
        finally:
            ingester.close()


# ---------------------------------------------------------------------- reports


def _emit_at(mw: AuditMiddleware, pipeline: Any, raw: dict[str, Any], when: datetime) -> None:
    """Replays a real pipeline run's lifecycle events at another time (for a past month)."""

    class Shift(Middleware):
        def on_event(self, ev: LifecycleEvent) -> None:
            mw.on_event(
                LifecycleEvent(
                    stage=ev.stage,
                    ctx=ev.ctx,
                    time=when,
                    status=ev.status,
                    decision=ev.decision,
                    reason=ev.reason,
                    result=ev.result,
                )
            )

    pipeline.middleware = [Shift()]
    run_action(pipeline, raw)


def test_canned_reports_on_a_seeded_workload(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    last_month = (now.replace(day=1) - timedelta(days=1)).replace(day=10)
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        pipeline = make_pipeline(mw)
        acme = [action("ok") for _ in range(3)] + [action("fail")]
        beta = [action("ok", tenant="beta") for _ in range(2)]
        beta += [action("ok", tenant="beta", memory_mb=4096), action("timeout", tenant="beta")]
        for raw in acme + beta:
            run_action(pipeline, raw)
        run_action(pipeline, acme[0], attempt=2)  # a redelivery: one action, two attempts
        old = [action("ok") for _ in range(5)]
        for raw in old:
            _emit_at(mw, make_pipeline(mw), raw, last_month)
        assert mw.flush(10)
        mw.close()
        ingester = Ingester(
            rs.url(), f"chdb://{tmp_path}/store", batch_age_s=0.1, serve_queries=False
        )
        try:
            drain(ingester)
            db = ingester.client
            usage = reports.usage(db, now.strftime("%Y-%m"))
            by_tenant = {u["tenant_id"]: u for u in usage}
            assert set(by_tenant) == {"acme", "beta"}
            assert by_tenant["acme"]["actions"] == 4 and by_tenant["acme"]["attempts"] == 5
            assert by_tenant["acme"]["succeeded"] == 4
            assert by_tenant["beta"]["actions"] == 4 and by_tenant["beta"]["succeeded"] == 2
            assert by_tenant["beta"]["primitive"] == "code"
            prev = reports.usage(db, last_month.strftime("%Y-%m"))
            assert [(u["tenant_id"], u["actions"]) for u in prev] == [("acme", 5)]

            tenant_rows = reports.tenant(db, "beta", days=30)
            assert len(tenant_rows) == 4
            statuses = sorted(t["status"] for t in tenant_rows)
            assert statuses == ["denied", "succeeded", "succeeded", "timed_out"]
            assert len(reports.tenant(db, "acme", days=30)) == 4  # last month's excluded
            assert len(reports.tenant(db, "acme", days=60)) == 9

            denied = reports.denials(db, days=7)
            kinds = sorted((d["tenant_id"], d["error_type"]) for d in denied)
            assert kinds == [
                ("acme", "resource_exhausted"),
                ("beta", "policy_denied"),
                ("beta", "timeout"),
            ]
            assert reports.denials(db, days=7, tenant_id="acme")[0]["reason"]

            text = reports.summary(db, since_minutes=10)
            assert "finished=9" in text and "denied=1" in text
            with pytest.raises(ValueError):
                reports.usage(db, "2026-13")
        finally:
            ingester.close()


# ---------------------------------------------------------------- CLI while running


def _cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit.cli", "audit", *args, "--dsn", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_queries_while_the_ingester_holds_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    dsn = f"chdb://{store}"
    with redis_for_test(tmp_path / "redis") as rs:
        ids = _emit_actions(rs.url(), tmp_path / "spool", 3)
        ing = IngesterProcess.start(rs.url(), dsn, tmp_path / "ing.log", "--batch-age", "0.1")
        try:
            wait_for(lambda: int(rs.client().xlen(STREAM)) == 0, 60, "ingestion")
            remote(store, ing)
            out = _cli("sql", "SELECT count() AS n FROM actionfleet.audit_events", dsn=dsn)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"n": 12}
            out = _cli("trace", ids[1], dsn=dsn)
            assert out.returncode == 0, out.stderr
            stages = [json.loads(line)["stage"] for line in out.stdout.splitlines()]
            assert stages == ["received", "policy", "started", "finished"]
            out = _cli("report", "usage", dsn=dsn)
            assert out.returncode == 0 and json.loads(out.stdout)["actions"] == 3
            for bad in (
                "DROP TABLE actionfleet.audit_events",
                "SELECT 1; DROP TABLE actionfleet.audit_events",
            ):
                out = _cli("sql", bad, dsn=dsn)
                assert out.returncode == 2 and "error" in out.stderr
            # readonly=1 in the engine too: table functions that touch files are refused
            out = _cli("sql", "SELECT * FROM file('/etc/hostname', 'LineAsString')", dsn=dsn)
            assert out.returncode == 1 and "readonly" in out.stderr.lower()
            env = {
                "ACTIONFLEET_BROKER_URL": rs.url(),
                "ACTIONFLEET_CLICKHOUSE_DSN": dsn,
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(ROOT),
            }
            demo = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "from audit.reports import demo_summary; print(demo_summary(tenant_id='acme'))",
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "finished=3" in demo.stdout, demo.stdout + demo.stderr
            db = remote(store, ing)
            with pytest.raises(ValueError):
                db.query("INSERT INTO actionfleet.audit_events (stage) VALUES ('x')")
        finally:
            assert ing.stop() == 0, ing.tail()
        # No ingester: the CLI opens the store itself.
        out = _cli("sql", "SELECT count() AS n FROM actionfleet.action_results", dsn=dsn)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"n": 3}


# ---------------------------------------------------------------------- schema


def test_schema_is_versioned_and_retention_configurable(tmp_path: Path) -> None:
    client = connect(f"chdb://{tmp_path}/store")
    try:
        assert migrate(client, retention_days=365) == 1
        assert migrate(client, retention_days=30) == 1  # no re-run, TTL reconciled
        versions = client.query("SELECT version FROM actionfleet.schema_migrations").result_rows
        assert versions == [(1,)]
        for table in ("audit_events", "action_results"):
            engine = client.query(
                "SELECT engine_full, partition_key FROM system.tables "
                "WHERE database = 'actionfleet' AND name = {t:String}",
                parameters={"t": table},
            ).result_rows[0]
            assert "toIntervalDay(30)" in engine[0], engine
            assert engine[1].startswith("toYYYYMM(")
        cols = dict(
            client.query(
                "SELECT name, type FROM system.columns WHERE database = 'actionfleet' "
                "AND table = 'audit_events'"
            ).result_rows
        )
        assert cols["tenant_id"] == "LowCardinality(String)"
        assert cols["gen_ai.tool.name"] == "String"  # OpenTelemetry alias of primitive
    finally:
        client.close()


def test_a_duplicate_delivery_is_audited_but_not_billed_twice(tmp_path: Path) -> None:
    """A redelivery answered from the idempotency record leaves its own `finished` event
    (decision `duplicate`) but no second row in action_results."""
    from producer.models import ActionResult
    from producer.validation import parse_action

    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        raw = action("print('once')")
        first = run_action(make_pipeline(mw), raw)
        ctx = ActionContext(primitive="code", queue="actions.code", worker="w", attempt=2, raw=raw)
        ctx.action = parse_action(raw)
        mw.on_event(
            LifecycleEvent(
                stage="finished",
                ctx=ctx,
                time=datetime.now(UTC),
                status=first["status"],
                decision="duplicate",
                result=ActionResult.model_validate(first),
            )
        )
        assert mw.flush(10)
        mw.close()
        ingester = Ingester(
            rs.url(), f"chdb://{tmp_path}/store", batch_age_s=0.1, serve_queries=False
        )
        try:
            drain(ingester)
            db = ClientReader(ingester.client, own=False)
            aid = raw["action_id"]
            decisions = scalar(
                db,
                "SELECT groupArray(policy_decision) FROM (SELECT policy_decision FROM "
                f"actionfleet.audit_events WHERE action_id = '{aid}' AND stage = 'finished' "
                "ORDER BY event_time)",
            )
            assert decisions == ["allow", "duplicate"]
            n = f"SELECT count() FROM actionfleet.action_results WHERE action_id = '{aid}'"
            assert scalar(db, n) == 1
        finally:
            ingester.close()
