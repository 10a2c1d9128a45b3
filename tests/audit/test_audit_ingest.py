"""The ingester against real Redis and real chDB through clickhouse-connect: every stage
lands, exactly once across SIGKILLs, the backlog waits out an unavailable store, bad data
is dead-lettered.

Events come from the production pipeline and ``AuditMiddleware`` (only the executor is
scripted, see ``tests/audit_fixtures.py``); ingesters run in-process where the test needs
to step them, and as real subprocesses where the test kills them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from audit import reports
from audit.config import DEAD_STREAM, GROUP, STREAM
from audit.emitter import AuditMiddleware
from audit.store import ClientReader
from tests.audit_fixtures import (
    IngesterProcess,
    action,
    drain,
    drained_ingester,
    emit_actions,
    make_pipeline,
    redis_for_test,
    remote,
    run_action,
    scalar,
    stream_events,
    wait_for,
)
from workers.middleware import ActionContext, LifecycleEvent
from workers.ops.fleet import free_port

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("need_chdb")]


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

        with drained_ingester(rs.url(), tmp_path / "store", batch_size=50) as ingester:
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
            versions = db.query(
                "SELECT version FROM actionfleet.schema_migrations ORDER BY version"
            ).rows
            assert versions == [[1], [2], [5]]  # v5: governance (policy_rule_id, approver)


# ------------------------------------------------------------------- exactly once


def test_ingester_sigkill_mid_batch_every_event_exactly_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        ids = emit_actions(rs.url(), tmp_path / "spool", 600)
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
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
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
            emit_actions(rs.url(), tmp_path / "spool", 200)  # every action still succeeds
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
            emit_actions(rs.url(), tmp_path / "spool", 100)
            wait_for(lambda: "audit store unavailable" in ing.tail(), 60, "a store error")
            time.sleep(1.0)
            assert stream_events(r) == 400
            assert ing.proc.poll() is None  # it waits, it does not die
        finally:
            ing.stop()
        # The store returns (here: the configured store is reachable again).
        with drained_ingester(rs.url(), tmp_path / "store") as ingester:
            assert ingester.client.query(
                "SELECT count() FROM actionfleet.audit_events"
            ).result_rows == [(400,)]


# ----------------------------------------------------------------- dead letters


def test_malformed_entries_dead_lettered_and_ingestion_continues(tmp_path: Path) -> None:
    with redis_for_test(tmp_path / "redis") as rs:
        r = rs.client()
        emit_actions(rs.url(), tmp_path / "spool", 5)
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
        emit_actions(rs.url(), tmp_path / "spool", 5)  # after the bad ones
        with drained_ingester(rs.url(), tmp_path / "store", batch_size=1000) as ingester:
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
            emit_actions(rs.url(), tmp_path / "spool", 2)
            drain(ingester)
            rows = ingester.client.query("SELECT count() FROM actionfleet.audit_events").result_rows
            assert rows == [(48,)]
