"""Turn raw input into an ``Action``, or into field-level errors a model can act on."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from producer.errors import FieldError, InvalidAction
from producer.models import PRIMITIVES, Action, action_adapter

__all__ = ["MAX_MESSAGE_BYTES", "field_errors", "parse_action"]

MAX_MESSAGE_BYTES = 12 * 1024 * 1024

_FIXES: dict[str, str] = {
    "missing": "add this field",
    "extra_forbidden": "remove this field; see `actionfleet schema` for the allowed fields",
    "union_tag_invalid": f"set 'primitive' to one of: {', '.join(PRIMITIVES)}",
    "union_tag_not_found": f"add 'primitive', one of: {', '.join(PRIMITIVES)}",
    "literal_error": "use one of the allowed values",
    "string_too_long": "send less: shorten this value",
    "string_too_short": "give a non-empty value",
    "too_long": "send fewer items",
    "too_short": "give at least one item",
    "less_than_equal": "lower this value",
    "less_than": "lower this value",
    "greater_than": "raise this value",
    "greater_than_equal": "raise this value",
    "string_pattern_mismatch": "use letters, digits and . _ : @ / - only",
    "timezone_aware": "give a time zone, e.g. 2026-01-01T00:00:00Z",
    "datetime_from_date_parsing": "use RFC 3339, e.g. 2026-01-01T00:00:00Z",
    "datetime_parsing": "use RFC 3339, e.g. 2026-01-01T00:00:00Z",
    "json_invalid": "send one JSON object",
    "int_parsing": "give a whole number",
    "int_type": "give a whole number",
    "float_parsing": "give a number",
    "float_type": "give a number",
    "string_type": "give a string",
    "bool_parsing": "give true or false",
    "dict_type": "send a JSON object here",
    "list_type": "send a JSON array here",
    "uuid_parsing": "give a UUID",
    "model_type": "send a JSON object here",
    "model_attributes_type": "send a JSON object here",
}


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    # A discriminated union puts the tag ("code") first; the agent never wrote it.
    if parts and parts[0] in PRIMITIVES:
        parts = parts[1:]
    # Tags in parentheses name a union's branch (e.g. "(selector)"), not a field.
    parts = [p for p in parts if not (isinstance(p, str) and p.startswith("("))]
    return ".".join(str(p) for p in parts) or "(message)"


def field_errors(exc: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for err in exc.errors(include_url=False, include_input=False):
        fix = _FIXES.get(err["type"], "correct this value")
        ctx = err.get("ctx") or {}
        if "max_length" in ctx:
            fix = f"{fix} (at most {ctx['max_length']})"
        elif "le" in ctx:
            fix = f"{fix} (at most {ctx['le']})"
        elif "ge" in ctx:
            fix = f"{fix} (at least {ctx['ge']})"
        elif "expected" in ctx:
            fix = f"use one of: {ctx['expected']}"
        reason = err["msg"].removeprefix("Value error, ")
        field = "primitive" if err["type"].startswith("union_tag") else _field_path(err["loc"])
        out.append({"field": field, "reason": reason, "fix": fix})
    return out


def parse_action(data: Any) -> Action:
    """Validate a dict, JSON text or an already-built action. Raises ``InvalidAction``."""
    if isinstance(data, (str, bytes, bytearray)):
        if len(data) > MAX_MESSAGE_BYTES:
            raise InvalidAction(
                [
                    {
                        "field": "(message)",
                        "reason": f"message is {len(data)} bytes",
                        "fix": f"send at most {MAX_MESSAGE_BYTES} bytes",
                    }
                ]
            )
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidAction(
                [
                    {
                        "field": "(message)",
                        "reason": f"not JSON: {exc}",
                        "fix": _FIXES["json_invalid"],
                    }
                ]
            ) from None
    if hasattr(data, "model_dump") and getattr(data, "primitive", None) in PRIMITIVES:
        # Re-validate built models too: they may have been mutated after construction.
        data = data.model_dump(mode="json", by_alias=True)
    if not isinstance(data, dict):
        raise InvalidAction(
            [{"field": "(message)", "reason": "not a JSON object", "fix": _FIXES["model_type"]}]
        )
    try:
        return action_adapter.validate_python(data)
    except ValidationError as exc:
        raise InvalidAction(field_errors(exc)) from None
