"""The workflow model on its own: what a workflow file may say, and how ``$ref`` and
``when`` resolve (workers.workflows.refs); the fleet runs them in
tests/workers/test_workflows.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from producer.workflows import StepCondition, WorkflowBuilder, WorkflowSpec, ref, refs_in
from workers.workflows.refs import RefError, condition_holds, resolve


def _spec(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"tenant_id": "acme", "agent_id": "a", "steps": list(steps)}


def _files(path: str, **extra: Any) -> dict[str, Any]:
    return {"primitive": "files", "payload": {"op": "read", "path": path, **extra}}


def test_a_reference_must_name_an_earlier_step() -> None:
    with pytest.raises(ValidationError, match="names no earlier step"):
        WorkflowSpec.model_validate(
            _spec(
                {"id": "a", "action": _files("x", encoding=ref("steps.b.output.encoding"))},
                {"id": "b", "action": _files("y")},
            )
        )
    with pytest.raises(ValidationError, match="is not steps"):
        WorkflowSpec.model_validate(
            _spec({"id": "a", "action": _files("x")}, {"id": "b", "action": _files(ref("a"))})
        )


def test_steps_cannot_choose_their_tenant_ids_or_keys_and_ids_are_unique() -> None:
    bad = _files("x") | {"tenant_id": "other"}
    with pytest.raises(ValidationError, match="come from"):
        WorkflowSpec.model_validate(_spec({"id": "a", "action": bad}))
    with pytest.raises(ValidationError, match="used twice"):
        WorkflowSpec.model_validate(
            _spec({"id": "a", "action": _files("x")}, {"id": "a", "action": _files("y")})
        )
    with pytest.raises(ValidationError, match="not earlier"):
        WorkflowSpec.model_validate(
            _spec({"id": "a", "action": _files("x"), "when": {"step": "a"}})
        )


def test_the_builder_makes_the_same_spec_as_the_data() -> None:
    built = (
        WorkflowBuilder("acme", "a", workflow_id="6f1c1a8e-0000-4000-8000-000000000001")
        .step(
            "w",
            "files",
            {"op": "write", "path": "x", "content": "1"},
            compensate=("files", {"op": "delete", "path": "x"}),
        )
        .step(
            "r",
            "files",
            {"op": "read", "path": ref("steps.w.output.path")},
            when=("w", ["succeeded"]),
        )
        .build()
    )
    assert [s.id for s in built.steps] == ["w", "r"]
    assert refs_in(built.steps[1].action) == ["steps.w.output.path"]
    assert built.primitives() == {"files"}


def test_refs_resolve_into_copies_and_say_what_is_missing() -> None:
    results = {"fetch": {"status": "succeeded", "output": {"links": ["u0", "u1"], "n": 2}}}
    template = {"to": [ref("steps.fetch.output.links.1")], "n": ref("steps.fetch.output.n")}
    assert resolve(template, results) == {"to": ["u1"], "n": 2}
    assert template["n"] == ref("steps.fetch.output.n")  # the template is untouched
    with pytest.raises(RefError, match="has no 'text'"):
        resolve(ref("steps.fetch.output.text"), results)
    with pytest.raises(RefError, match="has no result"):
        resolve(ref("steps.later.output"), results)
    assert condition_holds(StepCondition(step="fetch"), results)
    assert not condition_holds(StepCondition(step="fetch", status=["failed"]), results)
