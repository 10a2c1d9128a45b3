"""One client for both backends, the schema migrations, and read-only query access.

DSN: ``chdb:///abs/path`` (embedded chDB, one process per data directory) or
``http(s)://[user:password@]host:8123[/database]`` (a ClickHouse server). Both go
through clickhouse-connect.

Reaching a chDB store that the running ingester holds locked: the ingester serves
read-only queries on a loopback HTTP port (``audit.query_server``) and records it in
``<store>/actionfleet-query.json``; ``open_reader`` uses that when it answers, and opens
the store directly otherwise.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from audit.schema import DATABASE, MIGRATIONS, MIGRATIONS_TABLE, TTL_TABLES
from audit.sql_errors import explain

__all__ = [
    "ENDPOINT_FILE",
    "ClientReader",
    "QueryError",
    "QueryResult",
    "Reader",
    "RemoteReader",
    "StoreUnavailable",
    "check_read_only",
    "connect",
    "endpoint_file",
    "migrate",
    "open_reader",
    "parse_dsn",
]

ENDPOINT_FILE = "actionfleet-query.json"
READ_SETTINGS = {
    "readonly": 1,
    "max_execution_time": 60,
    "max_result_rows": 100_000,
    "result_overflow_mode": "break",
}


class StoreUnavailable(RuntimeError):
    """The ClickHouse store cannot be reached or opened (message says why and what to do)."""


@dataclass(frozen=True)
class Dsn:
    kind: str  # "chdb" | "http"
    path: Path | None = None
    url: str = ""
    host: str = ""
    port: int = 8123
    secure: bool = False
    username: str = "default"
    password: str = ""


def parse_dsn(dsn: str) -> Dsn:
    parts = urlsplit(dsn)
    if parts.scheme == "chdb":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError("chdb DSN needs a directory: chdb:///abs/path")
        return Dsn("chdb", path=Path(path))
    if parts.scheme in ("http", "https"):
        return Dsn(
            "http",
            url=dsn,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            secure=parts.scheme == "https",
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
        )
    raise ValueError(f"unsupported ClickHouse DSN {dsn!r}: use chdb:///path or http(s)://host:8123")


def connect(dsn: str, **kwargs: Any) -> Any:
    """A clickhouse-connect client for the DSN. Raises ``StoreUnavailable``."""
    import clickhouse_connect

    d = parse_dsn(dsn)
    try:
        if d.kind == "chdb":
            assert d.path is not None
            d.path.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(interface="chdb", path=str(d.path), **kwargs)
        return clickhouse_connect.get_client(
            host=d.host,
            port=d.port,
            secure=d.secure,
            username=d.username,
            password=d.password,
            connect_timeout=kwargs.pop("connect_timeout", 3),
            send_receive_timeout=kwargs.pop("send_receive_timeout", 30),
            **kwargs,
        )
    except Exception as exc:
        text = str(exc)
        if "Cannot lock file" in text:
            raise StoreUnavailable(
                f"the audit store {d.path} is locked by another process (chDB allows one); "
                "is an ingester running? It serves queries only when started by "
                "`actionfleet audit ingest` or `actionfleet up`"
            ) from exc
        raise StoreUnavailable(f"cannot open the audit store {dsn}: {text[:300]}") from exc


def migrate(client: Any, retention_days: int = 365) -> int:
    """Create or upgrade the schema; returns the version now in place."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {DATABASE}")
    client.command(MIGRATIONS_TABLE)
    rows = client.query(f"SELECT max(version) FROM {DATABASE}.schema_migrations").result_rows
    current = int(rows[0][0] or 0) if rows else 0
    for m in MIGRATIONS:
        if m.version <= current:
            continue
        for stmt in m.statements:
            client.command(stmt.replace("{retention_days}", str(int(retention_days))))
        client.insert(
            f"{DATABASE}.schema_migrations", [[m.version, m.name]], column_names=["version", "name"]
        )
        current = m.version
    _apply_retention(client, retention_days)
    return current


def _apply_retention(client: Any, days: int) -> None:
    """Retention is configuration, not schema: reconcile the TTL on every start."""
    for table, column in TTL_TABLES.items():
        engine = client.query(
            "SELECT engine_full FROM system.tables "
            "WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": DATABASE, "t": table},
        ).result_rows
        want = f"toDateTime({column}) + toIntervalDay({int(days)})"
        if engine and want not in engine[0][0]:
            client.command(
                f"ALTER TABLE {DATABASE}.{table} MODIFY TTL toDateTime({column}) + "
                f"INTERVAL {int(days)} DAY",
                settings={"materialize_ttl_after_modify": 0},  # no rewrite of old parts now
            )


# ---------------------------------------------------------------------------- reading

_ALLOWED = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)


def check_read_only(sql: str) -> str:
    """Statement check in front of the engine's own ``readonly=1``: one read statement."""
    text = sql.strip().rstrip(";").strip()
    if not _ALLOWED.match(text):
        raise ValueError("only SELECT / WITH / SHOW / DESCRIBE / EXPLAIN / EXISTS are allowed")
    if ";" in _strip_literals(text):
        raise ValueError("send one statement at a time")
    return text


def _strip_literals(sql: str) -> str:
    return re.sub(r"'(?:[^'\\]|\\.)*'|`[^`]*`|\"[^\"]*\"", "''", sql)


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


class Reader(Protocol):
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class ClientReader:
    """Read-only queries on a clickhouse-connect client (statement check + readonly=1).

    The default database is ``actionfleet`` once it exists, so ``FROM audit_events``
    works as people type it; a ClickHouse error becomes a ``QueryError`` of one line
    (``audit.sql_errors``)."""

    def __init__(self, client: Any, own: bool = True) -> None:
        self.client = client
        self.own = own
        self._use_database()

    def _use_database(self) -> None:
        # Only once it exists: the client applies its database to every query (USE), so
        # naming a missing one would break even the queries that create it.
        if getattr(self.client, "database", None) == DATABASE:
            return
        try:
            found = self.client.query(
                "SELECT count() FROM system.databases WHERE name = {db:String}",
                parameters={"db": DATABASE},
            ).result_rows
        except Exception:  # the store answers nothing: queries will say so themselves
            return
        if found and found[0][0]:
            self.client.database = DATABASE

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        text = check_read_only(sql)
        if getattr(self.client, "database", None) != DATABASE:
            self._use_database()  # a store the ingester created after this reader opened
        try:
            res = self.client.query(text, parameters=parameters or None, settings=READ_SETTINGS)
        except Exception as exc:
            why = explain(exc, text)
            if why is None:
                raise
            raise QueryError(why.message, name=why.name, subject=why.subject) from None
        return QueryResult(
            list(res.column_names), [[_jsonable(v) for v in row] for row in res.result_rows]
        )

    def close(self) -> None:
        if self.own:
            self.client.close()


class RemoteReader:
    """Queries through a running ingester's loopback endpoint."""

    def __init__(self, url: str, token: str, timeout_s: float = 70.0) -> None:
        self.url, self.token, self.timeout_s = url, token, timeout_s

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        check_read_only(sql)
        body = json.dumps({"sql": sql, "parameters": parameters or {}}).encode()
        req = urllib.request.Request(
            self.url + "/query",
            data=body,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
            except ValueError:
                body = {}
            raise QueryError(
                str(body.get("error") or exc),
                name=str(body.get("name") or ""),
                subject=str(body.get("subject") or ""),
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreUnavailable(f"the ingester's query endpoint does not answer: {exc}") from exc
        return QueryResult(data["columns"], data["rows"])

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def close(self) -> None:
        pass


class QueryError(ValueError):
    """ClickHouse refused the query (syntax, unknown column, readonly…): one line, plus
    ClickHouse's error name and the table, column or database it is about."""

    def __init__(self, message: str, *, name: str = "", subject: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.subject = subject


def endpoint_file(dsn: str) -> Path | None:
    d = parse_dsn(dsn)
    return d.path / ENDPOINT_FILE if d.kind == "chdb" and d.path else None


def open_reader(dsn: str) -> Reader:
    """A reader for the store: the ingester's endpoint for a busy chDB store, else direct."""
    ep = endpoint_file(dsn)
    if ep is not None and ep.is_file():
        try:
            info = json.loads(ep.read_text())
            remote = RemoteReader(info["url"], info["token"])
            if remote.ping():
                return remote
        except (OSError, ValueError, KeyError):
            pass
    d = parse_dsn(dsn)
    if d.kind == "chdb" and d.path is not None and not d.path.is_dir():
        raise StoreUnavailable(
            f"no audit store at {d.path} yet: it is created by the first ingester "
            "(`actionfleet up` or `actionfleet audit ingest`)"
        )
    return ClientReader(connect(dsn))
