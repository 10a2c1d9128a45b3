"""ClickHouse's answer to a bad query, as one line a person can act on.

ClickHouse errors arrive as ``Code: 60. DB::Exception: <message>. (UNKNOWN_TABLE)``,
wrapped by the driver (``HTTPDriver for … received ClickHouse error code 60``) and often
followed by the query's scope, the list of expected tokens or a stack trace. ``explain``
keeps what names the problem (the table, column or database, the position of a syntax
error, ClickHouse's own "maybe you meant") and says what to do next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SqlError", "explain"]

_START = re.compile(r"Code: (\d+)\. DB::Exception: ")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]{2,})\)")  # (UNKNOWN_TABLE); types are CamelCase
_SCOPE = re.compile(r"[.,]?\s+In scope .*?(?=(?:\.?\s+Maybe you meant)|$)", re.S | re.I)
_QUOTED = r"[`'\"]?([^`'\"\s,()]+)[`'\"]?"
_TABLES = "audit_events, action_results"


@dataclass(frozen=True, slots=True)
class SqlError:
    """What went wrong: one line, ClickHouse's error name, and the name it is about."""

    message: str
    name: str = ""  # e.g. UNKNOWN_TABLE
    subject: str = ""  # the table, column or database named


def _hint(text: str) -> str:
    m = re.search(r"Maybe you meant:? ?(.+?)[.?]?\s*$", text, re.S)
    return f"; maybe you meant {m.group(1).strip()}" if m else ""


def _syntax(body: str, sql: str) -> str:
    m = re.search(r"\(line (\d+), col (\d+)\):\s*(.{0,40})", body, re.S)
    if m is None:
        return "syntax error"
    line, col = int(m.group(1)), int(m.group(2))
    lines = sql.strip().splitlines() or [""]
    # The driver appends its own SETTINGS clause: a position past the query's own text
    # means the query stopped too early.
    if sql and (line > len(lines) or col > len(lines[line - 1])):
        return "syntax error: the query ends too early (an incomplete clause at its end?)"
    near = m.group(3).splitlines()[0].strip() if m.group(3).strip() else ""
    return f"syntax error at line {line}, column {col}" + (f", near {near!r}" if near else "")


def _generic(first: str, name: str) -> str:
    sentence = re.sub(r"^default: ", "", re.sub(r"\s+", " ", first))
    m = re.search(r":? while executing function (\w+) on arguments (\S+)", sentence)
    if m:
        column = m.group(2).split(".", 1)[-1] if m.group(2).startswith("__table") else m.group(2)
        sentence = sentence[: m.start()] + f" (in {m.group(1)}() on {column})"
    sentence = sentence.rstrip(". ")[:300]
    return f"{sentence} ({name})" if name else sentence


def explain(
    error: BaseException | str, sql: str = "", database: str = "actionfleet"
) -> SqlError | None:
    """One line for a ClickHouse error, or None when ``error`` is not one. ``sql`` is the
    query as sent, to place a syntax error."""
    raw = str(error)
    starts = list(_START.finditer(raw))
    if not starts:
        return None
    rest = raw[starts[-1].end() :].split("Stack trace", 1)[0]  # the innermost error
    rest = rest.split("(version ", 1)[0]
    names = list(_NAME.finditer(rest))
    name = names[-1].group(1) if names else ""
    body = rest[: names[-1].start()] if names else rest
    body = _SCOPE.sub("", body.strip()).strip()
    first = body.splitlines()[0].strip() if body else ""
    if name == "UNKNOWN_TABLE" and (m := re.search(r"(?:identifier|Table)\s+" + _QUOTED, first)):
        table = m.group(1)
        return SqlError(
            f"unknown table {table!r}{_hint(body)}; the audit tables are {_TABLES} "
            f"(database {database}, the default)",
            name,
            table,
        )
    if name == "UNKNOWN_IDENTIFIER" and (m := re.search(r"identifier\s+" + _QUOTED, first)):
        column = m.group(1)
        return SqlError(
            f"unknown column {column!r}{_hint(body)}; list the columns with "
            "DESCRIBE audit_events (or action_results)",
            name,
            column,
        )
    if name == "UNKNOWN_DATABASE" and (m := re.search(r"Database\s+" + _QUOTED, first)):
        db = m.group(1)
        return SqlError(
            f"unknown database {db!r}; the audit tables are in {database} "
            f"({_TABLES}), which is the default: no prefix is needed",
            name,
            db,
        )
    if name == "SYNTAX_ERROR":
        return SqlError(f"{_syntax(body, sql)} ({name})", name)
    return SqlError(_generic(first, name), name)
