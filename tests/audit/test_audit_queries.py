"""Reading the audit trail: canned reports on a seeded workload, the CLI while an
ingester holds the (real chDB) store and after it stopped, the versioned schema.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from audit import reports
from audit.config import STREAM
from audit.emitter import AuditMiddleware
from audit.ingest_write import repair_results
from audit.store import connect, migrate
from tests.audit_fixtures import (
    ROOT,
    IngesterProcess,
    action,
    drained_ingester,
    emit_actions,
    make_pipeline,
    redis_for_test,
    remote,
    run_action,
    wait_for,
)
from workers.middleware import LifecycleEvent, Middleware

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("need_chdb")]


# ---------------------------------------------------------------------- reports


def _emit_at(
    mw: AuditMiddleware, pipeline: Any, raw: dict[str, Any], when: datetime, attempt: int = 1
) -> None:
    """Replays a real pipeline run's lifecycle events at another (fixed) time."""

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
    run_action(pipeline, raw, attempt=attempt)


def _seed_times(today: datetime) -> tuple[datetime, datetime, datetime]:
    """(the workload's time, an earlier month's, the reports' ``now``), all far from any
    window or month boundary whatever ``today`` is: the workload on the 15th of the month
    before ``today`` at noon (14 to 46 days ago: inside the retention, in the past), the
    earlier rows 40 days before it (the 3rd to the 8th of the month before that), and the
    reports' ``now`` a day after the workload."""
    first = today.replace(day=1, hour=12, minute=0, second=0, microsecond=0)
    seeded = (first - timedelta(days=1)).replace(day=15)
    return seeded, seeded - timedelta(days=40), seeded + timedelta(days=1)


@pytest.mark.parametrize(
    "today",
    [datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC), datetime(2026, 12, 31, 23, 59, tzinfo=UTC)],
)
def test_seed_times_stay_clear_of_boundaries(today: datetime) -> None:
    seeded, earlier, now = _seed_times(today)
    assert seeded.day == 15 and seeded.month != earlier.month and 3 <= earlier.day <= 8
    assert timedelta(days=30) < now - earlier < timedelta(days=60)  # 41 days
    assert timedelta(days=7) > now - seeded > timedelta(minutes=10)  # 1 day


def test_canned_reports_on_a_seeded_workload(tmp_path: Path) -> None:
    # Seeded relative to today but never near a boundary: the outcome cannot depend on
    # the date, the hour or how long the run takes (issue 19).
    seeded, last_month, now = _seed_times(datetime.now(UTC))
    with redis_for_test(tmp_path / "redis") as rs:
        mw = AuditMiddleware(rs.url(), spool_dir=tmp_path / "spool")
        acme = [action("ok") for _ in range(3)] + [action("fail")]
        beta = [action("ok", tenant="beta") for _ in range(2)]
        beta += [action("ok", tenant="beta", memory_mb=4096), action("timeout", tenant="beta")]
        for raw in acme + beta:
            _emit_at(mw, make_pipeline(mw), raw, seeded)
        redelivery = make_pipeline(mw)  # a redelivery: one action, two attempts
        _emit_at(mw, redelivery, acme[0], seeded, attempt=2)
        old = [action("ok") for _ in range(5)]
        for raw in old:
            _emit_at(mw, make_pipeline(mw), raw, last_month)
        assert mw.flush(10)
        mw.close()
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
            db = ingester.client
            usage = reports.usage(db, seeded.strftime("%Y-%m"))
            by_tenant = {u["tenant_id"]: u for u in usage}
            assert set(by_tenant) == {"acme", "beta"}
            assert by_tenant["acme"]["actions"] == 4 and by_tenant["acme"]["attempts"] == 5
            assert by_tenant["acme"]["succeeded"] == 4
            assert by_tenant["beta"]["actions"] == 4 and by_tenant["beta"]["succeeded"] == 2
            assert by_tenant["beta"]["primitive"] == "code"
            prev = reports.usage(db, last_month.strftime("%Y-%m"))
            assert [(u["tenant_id"], u["actions"]) for u in prev] == [("acme", 5)]

            tenant_rows = reports.tenant(db, "beta", days=30, now=now)
            assert len(tenant_rows) == 4
            statuses = sorted(t["status"] for t in tenant_rows)
            assert statuses == ["denied", "succeeded", "succeeded", "timed_out"]
            assert len(reports.tenant(db, "acme", days=30, now=now)) == 4  # earlier excluded
            assert len(reports.tenant(db, "acme", days=60, now=now)) == 9
            # A window ends at its ``now``: nothing of the workload before it started.
            assert reports.tenant(db, "acme", days=30, now=seeded - timedelta(hours=1)) == []

            denied = reports.denials(db, days=7, now=now)
            kinds = sorted((d["tenant_id"], d["error_type"]) for d in denied)
            assert kinds == [
                ("acme", "resource_exhausted"),
                ("beta", "policy_denied"),
                ("beta", "timeout"),
            ]
            assert reports.denials(db, days=7, tenant_id="acme", now=now)[0]["reason"]

            text = reports.summary(db, since_minutes=24 * 60 + 10, now=now)
            assert "finished=9" in text and "denied=1" in text
            with pytest.raises(ValueError):
                reports.usage(db, "2026-13")


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
        ids = emit_actions(rs.url(), tmp_path / "spool", 3)
        ing = IngesterProcess.start(rs.url(), dsn, tmp_path / "ing.log", "--batch-age", "0.1")
        try:
            wait_for(lambda: int(rs.client().xlen(STREAM)) == 0, 60, "ingestion")
            remote(store, ing)
            out = _cli("sql", "SELECT count() AS n FROM actionfleet.audit_events", dsn=dsn)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"n": 12}
            _queries_as_people_type_them(dsn, events=12, results=3)
            out = _cli("trace", ids[1], dsn=dsn)
            assert out.returncode == 0, out.stderr
            stages = [json.loads(line)["stage"] for line in out.stdout.splitlines()]
            assert stages == ["received", "policy", "started", "finished"]
            # Usage of the months the actions finished in (two if the run straddled one's
            # end), asked by --month so the default (this month) cannot move under it.
            out = _cli(
                "sql",
                "SELECT DISTINCT formatDateTime(finished_at, '%Y-%m') AS m"
                " FROM actionfleet.action_results",
                dsn=dsn,
            )
            assert out.returncode == 0, out.stderr
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            months = sorted({r["m"] for r in rows})
            counted = 0
            for month in months:
                out = _cli("report", "usage", "--month", month, dsn=dsn)
                assert out.returncode == 0, out.stderr
                counted += json.loads(out.stdout)["actions"]
            assert counted == 3
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
        _queries_as_people_type_them(dsn, events=12, results=3)


def _one_line_error(out: subprocess.CompletedProcess[str], *names: str) -> str:
    assert out.returncode == 1 and out.stdout == "", out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and "DB::Exception" not in out.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _queries_as_people_type_them(dsn: str, events: int, results: int) -> None:
    """Without the database prefix, and errors as one line naming what is wrong."""
    out = _cli("sql", "SELECT count() AS n FROM audit_events", dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"n": events}
    out = _cli(
        "sql",
        "SELECT status, count() AS n FROM action_results WHERE tenant_id = {t:String} "
        "GROUP BY status",
        "--param",
        "t=acme",
        dsn=dsn,
    )
    assert out.returncode == 0, out.stderr
    assert sum(json.loads(line)["n"] for line in out.stdout.splitlines()) == results
    _one_line_error(_cli("sql", "SELECT tenant FROM audit_events", dsn=dsn), "'tenant'", "column")
    line = _one_line_error(_cli("sql", "SELECT * FROM audit_evnts", dsn=dsn), "'audit_evnts'")
    assert "table" in line and "audit_events" in line  # what exists
    _one_line_error(_cli("sql", "SELECT * FROM audit.audit_events", dsn=dsn), "'audit'")
    _one_line_error(_cli("sql", "SELECT * FROM audit_events WHERE", dsn=dsn), "syntax error")


# ---------------------------------------------------------------------- schema


def test_schema_is_versioned_and_retention_configurable(tmp_path: Path) -> None:
    from audit.schema import MIGRATIONS

    latest = MIGRATIONS[-1].version
    client = connect(f"chdb://{tmp_path}/store")
    try:
        assert migrate(client, retention_days=365) == latest
        assert migrate(client, retention_days=30) == latest  # no re-run, TTL reconciled
        versions = client.query("SELECT version FROM actionfleet.schema_migrations").result_rows
        assert sorted(versions) == [(m.version,) for m in MIGRATIONS]
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
        assert cols["key_id"] == "LowCardinality(String)"
        assert cols["blocked_requests"] == "UInt32"
        # v4: the Cedar rule and the approver of each policy decision (docs/policy.md)
        assert cols["policy_rule_id"] == cols["approver"] == "LowCardinality(String)"
        assert cols["gen_ai.tool.name"] == "String"  # OpenTelemetry alias of primitive
    finally:
        client.close()


def test_a_version_1_store_is_upgraded_with_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made before producer keys: v2 adds key_id and v4 blocked_requests to both
    tables and to the view that fills action_results, and keeps every row."""
    import audit.store
    from audit.schema import MIGRATIONS

    client = connect(f"chdb://{tmp_path}/store")
    finished = (
        "INSERT INTO actionfleet.audit_events (event_id, event_time, stage, status, action_id,"
        " tenant_id, schema_version{extra}) VALUES (generateUUIDv4(), now64(6), 'finished',"
        " 'succeeded', {action}, 'acme', 1{extra_value})"
    )
    try:
        monkeypatch.setattr(audit.store, "MIGRATIONS", MIGRATIONS[:1])
        assert migrate(client) == 1
        client.command(finished.format(extra="", action="'old'", extra_value=""))
        monkeypatch.setattr(audit.store, "MIGRATIONS", MIGRATIONS)
        assert migrate(client) == MIGRATIONS[-1].version
        client.command(
            finished.format(
                extra=", key_id, blocked_requests",
                action="'new'",
                extra_value=", 'k0123456789abcdef', 7",
            )
        )
        rows = client.query(
            "SELECT action_id, key_id, blocked_requests FROM actionfleet.action_results "
            "ORDER BY action_id"
        ).result_rows
        assert rows == [("new", "k0123456789abcdef", 7), ("old", "", 0)]
        # The ingester's repair of a results row lost to a kill writes the upgraded table
        # too (columns by name: key_id is not the table's last column).
        (event_id,) = client.query(
            "SELECT toString(event_id) FROM actionfleet.audit_events WHERE action_id = 'new'"
        ).result_rows[0]
        client.command(
            "DELETE FROM actionfleet.action_results WHERE action_id = 'new'",
            settings={"mutations_sync": 2},
        )
        repair_results(client, {event_id})
        rows = client.query(
            "SELECT action_id, key_id, status, blocked_requests FROM actionfleet.action_results "
            "WHERE action_id = 'new'"
        ).result_rows
        assert rows == [("new", "k0123456789abcdef", "succeeded", 7)]
    finally:
        client.close()
