"""The issue's example rules through a real worker on a real redis-server, with signed
actions: allowed and refused cases of each, the denial naming its rule in the result and
the audit row, and `actionfleet policy check` (a subprocess) agreeing with the fleet."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from producer.models import ActionResult
from tests.api_fixtures import ApiServer
from tests.governance_fixtures import GovFleet

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("tripwire")]


def files(agent: str, op: str, path: str, **payload: Any) -> dict[str, Any]:
    return {
        "primitive": "files",
        "tenant_id": "acme",
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"op": op, "path": path, **payload},
    }


def api(agent: str, method: str, url: str) -> dict[str, Any]:
    return {
        "primitive": "api",
        "tenant_id": "acme",
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"method": method, "url": url},
    }


def code(agent: str, workspace: str = "rw") -> dict[str, Any]:
    return {
        "primitive": "code",
        "tenant_id": "acme",
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"language": "python", "source": json.dumps({}), "workspace": workspace},
    }


def email(agent: str, *to: str) -> dict[str, Any]:
    return {
        "primitive": "email",
        "tenant_id": "acme",
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"to": list(to), "subject": "hi", "text": "x"},
    }


def denied_by(result: ActionResult, rule: str) -> None:
    assert result.status == "denied", result
    assert result.error is not None and result.error.type == "policy_denied", result.error
    assert result.error.details["rule_id"] == rule, result.error
    assert result.error.details["rule_description"], result.error
    assert rule in result.error.message, result.error.message


def wait_audit(fleet: GovFleet, action_id: str, stage: str, decision: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for row in fleet.audit_rows(action_id):
            if row["stage"] == stage and row["policy_decision"] == decision:
                return row
        time.sleep(0.1)
    raise AssertionError(f"no {stage}/{decision} audit row for {action_id}")


def test_diagnosis_agents_only_read(gov_fleet: GovFleet, api_server: ApiServer) -> None:
    client = gov_fleet.client()
    assert client.run(files("writer-1", "write", "notes/a.txt", content="hello"), 60).ok
    read = client.run(files("diagnose-7", "read", "notes/a.txt"), 60)
    assert read.ok and read.output is not None and read.output["content"] == "hello", read
    assert client.run(files("diagnose-7", "list", "notes"), 60).ok
    assert client.run(files("diagnose-7", "stat", "notes/a.txt"), 60).ok

    write = files("diagnose-7", "write", "notes/b.txt", content="no")
    denied_by(client.run(write, 60), "diagnose-read-only")
    assert not (gov_fleet.workspace / "acme" / "notes" / "b.txt").exists()
    row = wait_audit(gov_fleet, write["action_id"], "policy", "deny")
    assert row["policy_rule_id"] == "diagnose-read-only"
    assert "diagnosis agents only read" in row["policy_reason"]

    get = client.run(api("diagnose-7", "GET", api_server.url("/echo?d=get")), 60)
    assert get.ok, get
    post = client.run(api("diagnose-7", "POST", api_server.url("/echo?d=post")), 60)
    denied_by(post, "diagnose-read-only")
    assert [r.method for r in api_server.seen("/echo")].count("POST") == 0
    # Another agent may write and POST.
    assert client.run(api("ops-1", "POST", api_server.url("/echo?d=ops")), 60).ok


def test_nothing_under_reports_is_deleted(gov_fleet: GovFleet) -> None:
    client = gov_fleet.client()
    for path in ("reports/q3.txt", "reportsx/q3.txt"):
        assert client.run(files("writer-1", "write", path, content="x"), 60).ok
    for agent, path in [
        ("writer-1", "reports/q3.txt"),
        ("builder-1", "./reports//q3.txt"),  # the same file, spelled otherwise
        ("writer-1", "reports"),
    ]:
        denied_by(client.run(files(agent, "delete", path), 60), "no-report-deletes")
    assert (gov_fleet.workspace / "acme" / "reports" / "q3.txt").exists()
    assert client.run(files("writer-1", "delete", "reportsx/q3.txt"), 60).ok
    assert not (gov_fleet.workspace / "acme" / "reportsx" / "q3.txt").exists()


def test_approval_rules_hold_back_only_what_they_name(gov_fleet: GovFleet) -> None:
    """email outside acme.com and rw code outside builders wait for a human; the rest runs."""
    client = gov_fleet.client()
    sent = client.run(email("mailer", "a@acme.com", "b@acme.com"), 60)
    assert sent.ok, sent
    assert any(m.rcpt_tos == ["a@acme.com", "b@acme.com"] for m in gov_fleet.smtp.received)
    outside = client.run(email("mailer", "a@acme.com", "x@partner.org"), 60)
    assert outside.status == "awaiting_approval" and outside.output is not None, outside
    assert outside.output["rule_id"] == "external-email"
    assert client.run(code("builder-2"), 60).ok
    assert client.run(code("analyst-1", workspace="ro"), 60).ok
    parked = client.run(code("analyst-1"), 60)
    assert parked.status == "awaiting_approval" and parked.output is not None, parked
    assert parked.output["rule_id"] == "code-rw-builders"
    assert not parked.final


CHECKED = [
    files("diagnose-1", "read", "notes/a.txt"),
    files("diagnose-1", "write", "notes/c.txt", content="x"),
    files("anyone", "delete", "reports/q3.txt"),
    files("anyone", "stat", "reports/q3.txt"),
    email("mailer", "a@acme.com"),
    email("mailer", "a@elsewhere.net"),
    code("analyst-2"),
    code("builder-9"),
]


def _fleet_decision(result: ActionResult) -> tuple[str, str | None]:
    if result.status == "awaiting_approval":
        assert result.output is not None
        return "require_approval", result.output["rule_id"]
    if result.status == "denied":
        assert result.error is not None
        return "deny", result.error.details.get("rule_id")
    return "allow", None


def test_policy_check_agrees_with_the_fleet(gov_fleet: GovFleet) -> None:
    client = gov_fleet.client()
    for action in CHECKED:
        code_, out = gov_fleet.cli_json("policy", "check", json.dumps(action), "--explain")
        assert code_ == {"allow": 0, "deny": 1, "require_approval": 3}[out["decision"]], out
        fleet = _fleet_decision(client.run(action, 60))
        checked_rule = out.get("rule_id") or (
            out["rules"][0] if out["decision"] == "require_approval" else None
        )
        assert (out["decision"], checked_rule) == fleet, (action, out)
        assert out["explain"]["request"]["principal"]["id"] == action["agent_id"]


def test_policy_validate_refuses_a_broken_file(gov_fleet: GovFleet) -> None:
    code_, out = gov_fleet.cli_json("policy", "validate", str(gov_fleet.policy))
    assert code_ == 0 and out["valid"], out
    assert {r["id"] for r in out["rules"]} >= {"diagnose-read-only", "no-report-deletes"}
    bad = gov_fleet.policy.with_name("bad.yaml")
    text = gov_fleet.policy.read_text().replace("resource.path like", "resource.pth like")
    bad.write_text(text)
    code_, out = gov_fleet.cli_json("policy", "validate", str(bad))
    assert code_ == 2 and not out["valid"], out
    assert "no-report-deletes" in out["error"] and "pth" in out["error"], out
