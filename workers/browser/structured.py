"""Structured extraction: named selectors and tables, as JSON under ``output.data``.

A named selector (``{"name", "selector", "attr", "all"}``) reads the text, the inner HTML
or an attribute of the elements a Playwright selector matches (CSS, ``text=…``,
``xpath=…``); ``tables`` reads every ``<table>`` as header + rows. Both run inside the
page (one ``evaluate`` each) on the rendered DOM, without waiting: steps are where an
action waits. Everything is bounded: at most ``MAX_MATCHES`` values per selector,
``MAX_TABLES`` tables of ``MAX_ROWS`` rows, and the JSON of ``data`` within the tenant's
``max_extract_chars``; whatever was cut is named in ``truncated`` (``data.<name>``).
"""

from __future__ import annotations

import json
from typing import Any

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page

from producer.errors import ValidationError_
from producer.models import ExtractSelector

__all__ = ["MAX_MATCHES", "MAX_ROWS", "MAX_TABLES", "extract_data", "fit"]

MAX_MATCHES = 1_000
MAX_TABLES = 100
MAX_ROWS = 5_000

# Text as a reader sees it: each line's whitespace squashed, blank lines dropped.
_TEXT_JS = r"""
const squash = (t) => (t || '').split('\n').map((l) => l.replace(/\s+/g, ' ').trim())
  .filter(Boolean).join('\n');
"""

# Attributes whose DOM property is the resolved absolute URL.
_URL_ATTRS = ["href", "src", "action", "formAction", "poster", "cite"]

_SELECT_JS = (
    "(els, [attr, max, urlAttrs]) => {"
    + _TEXT_JS
    + r"""
  const read = (el) => {
    if (attr === 'text') return squash(el.innerText ?? el.textContent);
    if (attr === 'html') return el.innerHTML;
    if (urlAttrs.includes(attr) && typeof el[attr] === 'string' && el.hasAttribute(attr))
      return el[attr];
    return el.getAttribute(attr);
  };
  return {count: els.length, values: els.slice(0, max).map(read)};
}"""
)

_TABLES_JS = (
    "([maxTables, maxRows]) => {"
    + _TEXT_JS
    + r"""
  const cells = (row) => [...row.cells].map((c) => squash(c.innerText ?? c.textContent));
  const all = [...document.querySelectorAll('table')];
  const tables = all.slice(0, maxTables).map((t) => {
    const rows = [...t.rows];
    let header = [];
    let body = rows;
    const head = t.tHead ? [...t.tHead.rows] : [];
    if (head.length) {
      header = cells(head[head.length - 1]);
      body = rows.filter((r) => r.parentElement !== t.tHead);
    } else if (rows.length && rows[0].cells.length &&
               [...rows[0].cells].every((c) => c.tagName === 'TH')) {
      header = cells(rows[0]);
      body = rows.slice(1);
    }
    const caption = t.caption ? squash(t.caption.innerText ?? t.caption.textContent) : '';
    return {caption, header, rows: body.slice(0, maxRows).map(cells), row_count: body.length};
  });
  return {count: all.length, tables};
}"""
)


def _size(value: Any) -> int:
    """Characters of ``value`` as JSON (json.dumps' default separators, ", " and ": ")."""
    return len(json.dumps(value, ensure_ascii=False))


def fit(value: Any, budget: int) -> tuple[Any, bool]:
    """``value`` cut to at most ``budget`` characters of JSON: strings are shortened,
    lists keep their first items, a table keeps its first rows. (value, was_cut)."""
    if _size(value) <= budget:
        return value, False
    if isinstance(value, str):
        cut = value[: max(0, budget - 2)]
        while cut and _size(cut) > budget:  # escapes take more than one character
            cut = cut[: len(cut) * 3 // 4]
        return cut, True
    if isinstance(value, list):
        out: list[Any] = []
        used = 2  # the brackets
        for item in value:
            sep = 2 if out else 0
            size = _size(item) + sep
            if used + size > budget:
                room = budget - used - sep
                part, _ = fit(item, room)
                if isinstance(item, dict | list) and part and _size(part) <= room:
                    out.append(part)
                break
            out.append(item)
            used += size
        return out, True
    if isinstance(value, dict) and isinstance(value.get("rows"), list):
        head = {**value, "rows": []}
        rows, _ = fit(value["rows"], max(0, budget - _size(head)))
        return {**value, "rows": rows}, True
    return None, True


async def extract_data(
    page: Page,
    selectors: list[tuple[int, ExtractSelector]],
    tables: bool,
    max_chars: int,
) -> tuple[dict[str, Any], list[str]]:
    """``output.data`` and the names of what was cut. ``selectors`` carry their index in
    ``payload.extract`` so a bad selector is reported by field."""
    data: dict[str, Any] = {}
    truncated: list[str] = []
    for i, sel in selectors:
        try:
            found = await page.locator(sel.selector).evaluate_all(
                _SELECT_JS, [sel.attr, MAX_MATCHES if sel.all else 1, _URL_ATTRS]
            )
        except PlaywrightError as exc:
            message = str(getattr(exc, "message", None) or exc).strip().splitlines()[0][:300]
            if "crash" in message.lower() or "closed" in message.lower():
                raise
            raise ValidationError_(
                f"payload.extract[{i}]: selector {sel.selector!r} cannot be used: {message}; "
                "use CSS ('.price'), 'text=Buy now' or 'xpath=//h2'",
                field=f"payload.extract[{i}].selector",
                reason=message,
                fix="correct the selector",
            ) from None
        values = found["values"]
        data[sel.name] = values if sel.all else (values[0] if values else None)
        if sel.all and found["count"] > MAX_MATCHES:
            truncated.append(f"data.{sel.name}")
    if tables:
        found = await page.evaluate(_TABLES_JS, [MAX_TABLES, MAX_ROWS])
        data["tables"] = found["tables"]
        if found["count"] > MAX_TABLES or any(
            t["row_count"] > len(t["rows"]) for t in found["tables"]
        ):
            truncated.append("data.tables")
    # Every key stays (the agent asked for it): first reserve each entry's key, ": ", ", "
    # and an empty value (at most "null"), then fill the entries in order from what is left.
    free = max_chars - 2 - sum(_size(name) + 8 for name in data)
    for name in list(data):
        value, cut = fit(data[name], max(0, free + 4))
        data[name] = value
        free -= _size(value) - 4
        if cut and f"data.{name}" not in truncated:
            truncated.append(f"data.{name}")
    return data, truncated
