"""Kept decisions keyed by what the rules read, and rules sliced per principal: both must
decide exactly as one Cedar evaluation of every rule of the action would.

The reference here is ``cedarpy.is_authorized`` on the action's whole slice, for every
request, with no kept decision; the subject is ``Ruleset.decide``, run twice over the same
requests in another order, so the second pass is answered from kept decisions.
"""

from __future__ import annotations

import json
import random
from typing import Any

import cedarpy
import pytest

from producer.models import Action
from producer.validation import parse_action
from tests.governance_fixtures import RULES
from workers.governance.model import request_for
from workers.governance.rules import _ACTION_ENTITIES, RulesConfig, Ruleset

EXTRA = """
@id("g1-no-deletes")
@description("group g1 deletes nothing")
forbid (principal in Group::"g1", action == Action::"files:delete", resource);

@id("bob-no-writes")
@description("bob writes nothing")
forbid (principal == Agent::"acme/bob", action == Action::"files:write", resource);

@id("one-file")
@description("one file is never read")
forbid (principal, action == Action::"files:read", resource == File::"vault/key");

@id("urgent-labels")
@outcome("approval")
@description("files writes labelled env=prod need approval")
forbid (principal, action == Action::"files:write", resource)
when { context.labels.contains("env=prod") };

@id("beta-tenant")
@description("tenant beta lists nothing")
forbid (principal in Tenant::"beta", action == Action::"files:list", resource);
"""

GROUPS = {"builders": ["builder-*"], "g1": ["acme/ops-*"]}


def _ruleset(cedar: str = RULES + EXTRA) -> Ruleset:
    return Ruleset(RulesConfig(cedar=cedar, groups=GROUPS))


def _files(op: str, path: str, *, tenant: str = "acme", agent: str = "plain",
           labels: dict[str, str] | None = None) -> Action:  # fmt: skip
    return parse_action(
        {"primitive": "files", "tenant_id": tenant, "agent_id": agent,
         "labels": labels or {}, "payload": {"op": op, "path": path}}
    )  # fmt: skip


def _action(rng: random.Random, n: int) -> Action:
    tenant = rng.choice(["acme", "acme", "beta"])
    agent = rng.choice(["bob", "ops-1", "builder-2", "diagnose-3", "hurry-4", "plain"])
    labels = {"env": "prod"} if rng.random() < 0.3 else {"env": "dev"}
    kind = rng.choice(["files", "files", "files", "code", "email", "api"])
    if kind == "files":
        op = rng.choice(["read", "write", "delete", "list", "stat"])
        path = rng.choice(["vault/key", "reports/a", "notes/b", "reports", "x"])
        payload: dict[str, Any] = {"op": op, "path": path}
        if op == "write":
            payload["content"] = f"body {n}"
    elif kind == "code":
        payload = {"language": "python", "source": f"print({n})",
                   "workspace": rng.choice(["none", "ro", "rw"])}  # fmt: skip
    elif kind == "email":
        to = rng.choice(["a@acme.com", "b@example.org"])
        payload = {"to": [to], "subject": f"s{n}", "text": f"t{n}"}
    else:
        payload = {"method": rng.choice(["GET", "POST"]), "url": "https://api.example.com/v1"}
    return parse_action(
        {"primitive": kind, "tenant_id": tenant, "agent_id": agent, "labels": labels,
         "payload": payload}
    )  # fmt: skip


def _reference(ruleset: Ruleset, action: Action) -> tuple[bool, list[str]]:
    """One Cedar evaluation of every rule of the action: no slice per principal, no
    kept decision."""
    req = request_for(action)
    groups = ruleset.groups_of(req.principal_attrs["tenant"], req.principal_attrs["id"])
    entities = _ACTION_ENTITIES.with_added_json_str(json.dumps(req.entities(groups)))
    res = cedarpy.is_authorized(req.request(), ruleset._sliced[req.action], entities)
    return bool(res.allowed), sorted(res.diagnostics.reasons)


def test_kept_and_sliced_decisions_are_cedars_own_for_every_request() -> None:
    rng = random.Random(7)
    actions = [_action(rng, n) for n in range(2000)]  # more than the 768 distinct requests
    ruleset = _ruleset()
    expected = {a.action_id: _reference(ruleset, a) for a in actions}
    outcomes: dict[str, str] = {}
    for round_ in range(2):
        order = actions if round_ == 0 else rng.sample(actions, len(actions))
        for action in order:
            verdict = ruleset.decide(action)
            allowed, reasons = expected[action.action_id]
            fired = sorted(r.policy_id for r in verdict.rules if r.policy_id)
            if verdict.outcome == "allow":
                assert allowed, (action, verdict)
            else:
                assert set(fired) <= set(reasons), (action, verdict, reasons)
                assert fired, (action, verdict)
            seen = outcomes.setdefault(action.action_id, verdict.outcome)
            assert seen == verdict.outcome  # the kept decision is the same one
    # Every rule decided something in this mix, and decisions were shared.
    assert {o for o in outcomes.values()} == {"allow", "deny", "require_approval"}
    assert len(ruleset._decided) < len(actions) / 2


def test_a_label_no_rule_reads_does_not_split_the_kept_decisions() -> None:
    rng = random.Random(1)
    without_labels = _ruleset(RULES)
    with_labels = _ruleset(RULES + EXTRA)  # urgent-labels reads context.labels
    stat = [
        _files("stat", "notes/b", labels={"n": str(n), "r": str(rng.random())}) for n in range(50)
    ]
    for action in stat:
        assert without_labels.decide(action).outcome == "allow"
        assert with_labels.decide(action).outcome == "allow"
    assert len(without_labels._decided) == 1
    assert len(with_labels._decided) == 50


def test_a_variable_used_whole_keys_by_all_of_it() -> None:
    # The labels reached through a record: the key must not drop them.
    cedar = (
        '@id("via-record") @description("through a record")\n'
        'forbid (principal, action == Action::"files:stat", resource)\n'
        'when { {c: context}.c.labels.contains("n=3") };'
    )
    ruleset = _ruleset(cedar)
    outcomes = [ruleset.decide(_files("stat", "x", labels={"n": str(n)})).outcome for n in range(6)]
    assert outcomes == ["allow", "allow", "allow", "deny", "allow", "allow"]


@pytest.mark.parametrize(
    ("tenant", "agent", "rule_kept"),
    [("acme", "ops-1", True), ("acme", "plain", False), ("beta", "ops-1", False)],
)
def test_rules_scoped_to_other_principals_are_sliced_away(
    tenant: str, agent: str, rule_kept: bool
) -> None:
    ruleset = _ruleset()
    delete = _files("delete", "notes/b", tenant=tenant, agent=agent)
    req = request_for(delete)
    groups = ruleset.groups_of(tenant, agent)
    sliced = ruleset._policies_for(req, groups)
    ids = {ruleset.rules[p].id for p in sliced.to_pst().static_policies}
    assert ("g1-no-deletes" in ids) is rule_kept
    assert "no-report-deletes" in ids  # scoped to everyone: always kept
    outcome = ruleset.decide(delete).outcome
    assert outcome == ("deny" if rule_kept else "allow")
    # Nothing to slice away: the action's own set is used, not a copy.
    stat = _files("stat", "x", tenant=tenant, agent=agent)
    stat_req = request_for(stat)
    assert ruleset._policies_for(stat_req, groups) is ruleset._sliced[stat_req.action]
