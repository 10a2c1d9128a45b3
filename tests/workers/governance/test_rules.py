"""The rules section on its own: what a policy file must say to load, what a broken edit
does to a running engine, default deny, and the webhook's egress guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from producer.errors import NetworkBlocked, PolicyDenied
from producer.validation import parse_action
from tests.governance_fixtures import RULES, webhook_server
from workers.governance.notify import notify
from workers.governance.rules import WebhookSettings
from workers.policy import PolicyEngine

pytestmark = pytest.mark.usefixtures("tripwire")


def _file(tmp_path: Path, cedar: str, **rules: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({"version": 1, "rules": {"cedar": cedar, **rules}}))
    return path


def _files(agent: str, op: str, path: str) -> object:
    return parse_action(
        {"primitive": "files", "tenant_id": "acme", "agent_id": agent,
         "payload": {"op": op, "path": path}}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cedar", "says"),
    [
        ('@description("x") forbid (principal, action, resource);', "no @id"),
        ('@id("a") forbid (principal, action, resource);', "no @description"),
        (
            '@id("a") @description("x") forbid (principal, action, resource);\n'
            '@id("a") @description("y") forbid (principal, action, resource);',
            "ids must be unique",
        ),
        (
            '@id("a") @description("x") @outcome("approval") permit (principal, action, resource);',
            "@outcome",
        ),
        (
            '@id("a") @description("x") forbid (principal, action == Action::"files:delete", '
            'resource) when { resource.pth == "x" };',
            "pth",
        ),
        ('@id("a") @description("x") forbid (principal, action, resource', "does not parse"),
    ],
)
def test_a_bad_rule_is_refused_when_the_file_loads(tmp_path: Path, cedar: str, says: str) -> None:
    with pytest.raises(ValueError, match="policy file") as info:
        PolicyEngine(_file(tmp_path, cedar))
    assert says in str(info.value)


def test_a_broken_edit_keeps_the_last_good_rules(tmp_path: Path) -> None:
    path = _file(tmp_path, RULES, groups={"builders": ["builder-*"]})
    engine = PolicyEngine(path)
    with pytest.raises(PolicyDenied) as info:
        engine.authorize(_files("anyone", "delete", "reports/a"))  # type: ignore[arg-type]
    assert info.value.details["rule_id"] == "no-report-deletes"
    path.write_text(path.read_text().replace('@id("no-report-deletes")', ""))
    os.utime(path, (1, 1))  # a different mtime: the engine reloads
    with pytest.raises(PolicyDenied):  # the last good rules still apply
        engine.authorize(_files("anyone", "delete", "reports/a"))  # type: ignore[arg-type]


def test_a_kept_decision_is_the_same_and_a_changed_policy_decides_again(tmp_path: Path) -> None:
    """Workers keep decisions (a pure function of request and rules); an edited policy is
    a new rule set that decides afresh, never from the old one's decisions."""
    path = _file(tmp_path, RULES, groups={"builders": ["builder-*"]})
    engine = PolicyEngine(path)
    for _ in range(2):  # the second is answered from the kept decision
        with pytest.raises(PolicyDenied) as info:
            engine.authorize(_files("anyone", "delete", "reports/a"))  # type: ignore[arg-type]
        assert info.value.details["rule_id"] == "no-report-deletes"
    assert engine.authorize(_files("anyone", "delete", "notes/a")).verdict.outcome == "allow"  # type: ignore
    edited = RULES.replace('like "reports/*"', 'like "notes/*"')
    assert edited != RULES
    _file(tmp_path, edited, groups={"builders": ["builder-*"]})
    os.utime(path, (1, 1))  # a different mtime: the engine reloads
    assert engine.authorize(_files("anyone", "delete", "reports/a")).verdict.outcome == "allow"  # type: ignore
    with pytest.raises(PolicyDenied):
        engine.authorize(_files("anyone", "delete", "notes/a"))  # type: ignore[arg-type]


def test_default_deny_allows_only_what_a_rule_permits(tmp_path: Path) -> None:
    cedar = (
        '@id("readers") @description("anyone may read")\n'
        'permit (principal, action in Action::"read_only", resource);\n'
        '@id("big-reads") @outcome("approval") @description("reads under big/ need approval")\n'
        'forbid (principal, action == Action::"files:read", resource)'
        ' when { resource.path like "big/*" };'
    )
    engine = PolicyEngine(_file(tmp_path, cedar, default="deny"))
    assert engine.authorize(_files("a", "read", "x")).verdict.outcome == "allow"  # type: ignore
    grant = engine.authorize(_files("a", "read", "big/x"))  # type: ignore[arg-type]
    assert grant.needs_approval and grant.verdict.rule.id == "big-reads"  # type: ignore
    with pytest.raises(PolicyDenied) as info:
        engine.authorize(_files("a", "mkdir", "x"))  # type: ignore[arg-type]
    assert info.value.details["rule_id"] == "default-deny"


def test_webhook_goes_through_the_egress_guard() -> None:
    state, httpd = webhook_server()
    try:
        url = f"http://127.0.0.1:{state.port}/hook"
        with pytest.raises(NetworkBlocked):  # default egress: loopback refused
            notify(WebhookSettings(url=url), {"id": "x"})
        assert state.bodies == []
        allowed = WebhookSettings.model_validate(
            {"url": url, "egress": {"allow_cidrs": ["127.0.0.0/8"], "any_port": True}}
        )
        assert notify(allowed, {"id": "y"}) == 204
        assert state.bodies == [{"id": "y"}]
    finally:
        httpd.shutdown()
        httpd.server_close()
