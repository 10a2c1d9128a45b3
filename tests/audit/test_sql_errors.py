"""ClickHouse errors as one line: against the real engine (chDB) and the texts a ClickHouse
server sends through clickhouse-connect's HTTP driver (no server can run here, so those
are given as the driver words them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.sql_errors import explain
from audit.store import ClientReader, QueryError, connect, migrate

pytestmark = pytest.mark.usefixtures("need_chdb")


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[ClientReader]:
    client = connect(f"chdb://{tmp_path}/store")  # chDB: one open store per process
    migrate(client)
    reader = ClientReader(client)
    yield reader
    reader.close()


@pytest.mark.parametrize(
    ("sql", "name", "subject", "words"),
    [
        ("SELECT tenant FROM audit_events", "UNKNOWN_IDENTIFIER", "tenant", ["column"]),
        ("SELECT * FROM audit_evnts", "UNKNOWN_TABLE", "audit_evnts", ["table", "audit_events"]),
        ("SELECT * FROM audit.action_results", "UNKNOWN_DATABASE", "audit", ["actionfleet"]),
        ("SELECT * FROM audit_events WHERE", "SYNTAX_ERROR", "", ["ends too early"]),
        ("SELECT count( FROM audit_events", "SYNTAX_ERROR", "", ["line 1, column"]),
        (
            "SELECT count() FROM action_results WHERE tenant_id = 1",
            "NO_COMMON_TYPE",
            "",
            ["tenant_id"],
        ),
    ],
)
def test_engine_errors_become_one_line(
    reader: ClientReader, sql: str, name: str, subject: str, words: list[str]
) -> None:
    with pytest.raises(QueryError) as info:
        reader.query(sql)
    err = info.value
    assert (err.name, err.subject) == (name, subject)
    text = str(err)
    assert "\n" not in text and "DB::Exception" not in text and "In scope" not in text
    for word in words:
        assert word in text, (word, text)


def test_default_database_and_the_prefix_both_work(reader: ClientReader) -> None:
    assert reader.query("SELECT count() AS n FROM audit_events").dicts() == [{"n": 0}]
    assert reader.query("SELECT count() AS n FROM actionfleet.audit_events").rows == [[0]]
    assert reader.query("SELECT currentDatabase() AS db").rows == [["actionfleet"]]


def test_a_reader_opened_before_the_database_exists(tmp_path: Path) -> None:
    client = connect(f"chdb://{tmp_path}/store")
    try:
        reader = ClientReader(client, own=False)  # nothing migrated: no default database yet
        assert reader.query("SELECT 1 AS one").rows == [[1]]
        migrate(client)
        assert reader.query("SELECT count() AS n FROM action_results").rows == [[0]]
    finally:
        client.close()


def test_server_texts_through_the_http_driver() -> None:
    unknown_column = (
        "HTTPDriver for http://127.0.0.1:8123 received ClickHouse error code 47\n"
        " Code: 47. DB::Exception: Unknown expression identifier `tenant` in scope SELECT "
        "tenant FROM actionfleet.audit_events. Maybe you meant: ['tenant_id']. "
        "(UNKNOWN_IDENTIFIER) (version 24.8.4.13 (official build))\n"
    )
    got = explain(unknown_column)
    assert got is not None and (got.name, got.subject) == ("UNKNOWN_IDENTIFIER", "tenant")
    assert "maybe you meant ['tenant_id']" in got.message
    with_trace = (
        "Code: 60. DB::Exception: Table actionfleet.audit_evnts does not exist. "
        "(UNKNOWN_TABLE) Stack trace (when copying this message, always include the lines "
        "below):\n\n0. DB::Exception::Exception(...) @ 0x000\n1. DB::Context::getTable @ 0x1\n"
    )
    got = explain(with_trace)
    assert got is not None and got.name == "UNKNOWN_TABLE"
    assert got.subject == "actionfleet.audit_evnts" and "0x" not in got.message
    assert explain(ConnectionError("connection refused")) is None  # not ClickHouse's
