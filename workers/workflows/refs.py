"""Resolving a step's ``{"$ref": "steps.<id>.output.<field>…"}`` values and ``when``."""

from __future__ import annotations

from typing import Any

from producer.workflows import REF_KEY, StepCondition

__all__ = ["RefError", "condition_holds", "resolve"]


class RefError(ValueError):
    """A reference that names nothing in the earlier steps' results."""


def lookup(path: str, results: dict[str, dict[str, Any]]) -> Any:
    parts = path.split(".")
    step = parts[1] if len(parts) > 1 else ""
    if parts[0] != "steps" or step not in results:
        raise RefError(f"$ref {path!r}: step {step!r} has no result")
    current: Any = results[step]
    for i, part in enumerate(parts[2:], 2):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            where = ".".join(parts[:i])
            raise RefError(f"$ref {path!r}: {where} has no {part!r}")
    return current


def resolve(value: Any, results: dict[str, dict[str, Any]]) -> Any:
    """``value`` with every ``$ref`` replaced by what it names (a copy)."""
    if isinstance(value, dict):
        if set(value) == {REF_KEY}:
            return lookup(str(value[REF_KEY]), results)
        return {k: resolve(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, results) for v in value]
    return value


def condition_holds(when: StepCondition | None, results: dict[str, dict[str, Any]]) -> bool:
    if when is None:
        return True
    earlier = results.get(when.step)
    return earlier is not None and earlier.get("status") in when.status
