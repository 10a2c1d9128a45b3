"""Human approval through a real worker and real Redis, with signed actions: a parked
action returns awaiting_approval at once and its handle resolves later; approve runs it
once, deny ends it denied, the timeout ends it expired; two approvers at once give one
run; the HTTP endpoint authenticates approvers; the webhook announces each request; every
decision is audited with the approver and the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from producer.client import ActionHandle
from tests.conftest import ROOT
from tests.governance_fixtures import GovFleet, make_fleet
from tests.reliability_fixtures import runs, wait_for
from tests.workers.governance.test_rules_fleet import email, wait_audit
from workers.governance.approvals import ApprovalStore
from workers.governance.approvers import ApproverStore
from workers.governance.http import ApprovalsServer
from workers.ops.fleet import free_port

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("tripwire")]


def parked_code(agent: str = "analyst-1") -> dict[str, Any]:
    """A code action the rule code-rw-builders parks (the probe counts its runs)."""
    return {
        "primitive": "code",
        "tenant_id": "acme",
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"language": "python", "source": json.dumps({}), "workspace": "rw"},
    }


def park(fleet: GovFleet, action: dict[str, Any] | None = None) -> tuple[ActionHandle, str]:
    handle = fleet.client().submit(action or parked_code())
    first = handle.result(timeout=60)
    assert first.status == "awaiting_approval" and not first.final, first
    assert first.output is not None
    return handle, first.output["approval_id"]


def run_count(fleet: GovFleet, action_id: str) -> int:
    return sum(1 for r in runs(fleet.probe_dir) if r["action_id"] == action_id)


def test_approved_action_runs_once_and_is_audited(gov_fleet: GovFleet) -> None:
    handle, approval_id = park(gov_fleet)
    assert approval_id == f"acme+{handle.action_id}"
    code, listed = gov_fleet.cli_json("approvals", "list")
    assert code == 0 and approval_id in [r["id"] for r in listed], listed
    code, shown = gov_fleet.cli_json("approvals", "show", approval_id)
    assert shown["status"] == "pending" and shown["rule_id"] == "code-rw-builders"
    assert shown["message"]["payload"]["workspace"] == "rw" and "auth" not in shown["message"]
    assert run_count(gov_fleet, handle.action_id) == 0
    code, out = gov_fleet.cli_json(
        "approvals", "approve", approval_id, "--reason", "reviewed the diff", "--as", "alice"
    )
    assert code == 0 and out["status"] == "approved" and out["decided_by"] == "alice", out
    final = handle.result(timeout=90, final=True)
    assert final.ok, final
    assert run_count(gov_fleet, handle.action_id) == 1
    # The request and the decision are audited, with the rule, the approver and the reason.
    asked = wait_audit(gov_fleet, handle.action_id, "policy", "require_approval")
    assert asked["policy_rule_id"] == "code-rw-builders" and asked["status"] == "awaiting_approval"
    approved = wait_audit(gov_fleet, handle.action_id, "policy", "approved")
    assert approved["approver"] == "alice" and approved["policy_reason"] == "reviewed the diff"
    wait_audit(gov_fleet, handle.action_id, "finished", "approved")
    # Approving again changes nothing and runs nothing.
    again = gov_fleet.cli("approvals", "approve", approval_id, "--reason", "twice")
    assert again.returncode == 1 and "already approved" in again.stderr, again
    assert run_count(gov_fleet, handle.action_id) == 1


def test_denied_action_ends_denied_and_never_runs(gov_fleet: GovFleet) -> None:
    handle, approval_id = park(gov_fleet)
    code, out = gov_fleet.cli_json(
        "approvals", "deny", approval_id, "--reason", "no writes today", "--as", "bob"
    )
    assert code == 0 and out["status"] == "denied", out
    final = handle.result(timeout=90, final=True)
    assert final.status == "denied" and final.error is not None, final
    details = final.error.details
    assert details["approver"] == "bob" and details["approver_reason"] == "no writes today"
    assert details["rule_id"] == "code-rw-builders"
    assert run_count(gov_fleet, handle.action_id) == 0
    row = wait_audit(gov_fleet, handle.action_id, "policy", "approval_denied")
    assert row["approver"] == "bob" and row["policy_reason"] == "no writes today"


def test_nobody_decides_in_time_and_it_expires(gov_fleet: GovFleet) -> None:
    handle, approval_id = park(gov_fleet, parked_code("hurry-1"))  # rule hurry: 2 s
    final = handle.result(timeout=120, final=True)
    assert final.status == "expired" and final.error is not None, final
    assert final.error.details["reason"] == "approval_timeout"
    assert run_count(gov_fleet, handle.action_id) == 0
    late = gov_fleet.cli("approvals", "approve", approval_id, "--reason", "too late")
    assert late.returncode == 1 and "expired" in late.stderr, late
    wait_audit(gov_fleet, handle.action_id, "policy", "expired")


def test_two_approvers_at_once_give_one_run(gov_fleet: GovFleet) -> None:
    handle, approval_id = park(gov_fleet)
    argv = [sys.executable, "-m", "workers.ops.cli", "approvals", "approve", approval_id]
    procs = [
        subprocess.Popen(
            [*argv, "--reason", f"ok from {who}", "--as", who],
            env=gov_fleet.env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for who in ("carol", "dave")
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outcomes
    assert handle.result(timeout=90, final=True).ok
    wait_for(lambda: run_count(gov_fleet, handle.action_id) >= 1, 30, "the run")
    assert run_count(gov_fleet, handle.action_id) == 1


def _http(
    url: str, token: str | None, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_endpoint_authenticates_approvers(gov_fleet: GovFleet) -> None:
    client = gov_fleet.redis.client()
    approvers = ApproverStore(client)
    _, token = approvers.add("erin", "acme")
    _, other = approvers.add("frank", "beta*")
    app = gov_fleet.client()._app  # publishes decided messages like the CLI's app
    server = ApprovalsServer(
        ("127.0.0.1", 0),
        ApprovalStore(client),
        approvers,
        lambda m: app.send_task(
            f"actionfleet.{m['primitive']}",
            kwargs={"message": m},
            queue=f"actions.{m['primitive']}",
            declare=[],
            task_id=f"{m['tenant_id']}+{m['action_id']}",
        ),
    )
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        handle, approval_id = park(gov_fleet)
        base = f"{server.url}/approvals"
        assert _http(base, None)[0] == 401
        assert _http(base, "afa1_not-a-token")[0] == 401
        status, body = _http(base, token)
        assert status == 200 and approval_id in [a["id"] for a in body["approvals"]]
        status, body = _http(base, other)
        assert status == 200 and approval_id not in [a["id"] for a in body["approvals"]]
        assert _http(f"{base}/{approval_id}/approve", other, {"reason": "x"})[0] == 403
        status, body = _http(f"{base}/{approval_id}/approve", token, {})
        assert status == 400 and body["error"]["field"] == "reason", body
        status, body = _http(f"{base}/{approval_id}/approve", token, {"reason": "looks fine"})
        assert status == 200 and body["decided_by"] == "erin", body
        assert _http(f"{base}/{approval_id}/deny", token, {"reason": "late"})[0] == 409
        assert handle.result(timeout=90, final=True).ok
        row = wait_audit(gov_fleet, handle.action_id, "policy", "approved")
        assert row["approver"] == "erin" and row["policy_reason"] == "looks fine"
    finally:
        server.shutdown()
        server.server_close()
        client.close()


def test_webhook_announces_each_request(gov_fleet: GovFleet) -> None:
    gov_fleet.webhook.got.clear()
    handle, approval_id = park(gov_fleet)
    wait_for(
        lambda: any(b["id"] == approval_id for b in gov_fleet.webhook.bodies), 30, "the webhook"
    )
    body = next(b for b in gov_fleet.webhook.bodies if b["id"] == approval_id)
    assert body["event"] == "approval_requested" and body["rule_id"] == "code-rw-builders"
    assert "auth" not in body["message"]
    gov_fleet.cli("approvals", "deny", approval_id, "--reason", "cleanup")
    assert handle.result(timeout=90, final=True).status == "denied"


def test_approver_tokens_from_the_command_line_and_the_served_endpoint(
    gov_fleet: GovFleet,
) -> None:
    """``approvals approver add|list|remove`` and ``approvals serve`` as an operator runs
    them: the token is printed once and never listed, it opens the served endpoint, and
    after ``remove`` it no longer does."""
    code, made = gov_fleet.cli_json("approvals", "approver", "add", "gina", "--tenants", "acme")
    assert code == 0 and made["name"] == "gina" and made["token"], made
    token = made["token"]
    code, listed = gov_fleet.cli_json("approvals", "approver", "list")
    assert code == 0 and "gina" in [a["name"] for a in listed]
    assert token not in json.dumps(listed)  # the fleet keeps only a hash

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "approvals", "serve", "--http",
         f"127.0.0.1:{port}"],
        env=gov_fleet.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/approvals"
    try:

        def answers() -> bool:
            try:
                return _http(base, None)[0] == 401
            except OSError:
                return False

        wait_for(answers, 30, "the approvals endpoint")
        handle, approval_id = park(gov_fleet)
        status, body = _http(base, token)
        assert status == 200 and approval_id in [a["id"] for a in body["approvals"]], body
        code, removed = gov_fleet.cli_json("approvals", "approver", "remove", "gina")
        assert code == 0 and removed["tokens_removed"], removed
        assert _http(base, token)[0] == 401
        assert _http(f"{base}/{approval_id}/approve", token, {"reason": "x"})[0] == 401
        # Still awaiting: nobody with a valid token decided it.
        assert handle.result(timeout=30).status == "awaiting_approval"
    finally:
        server.terminate()
        server.wait(15)
    code, _ = gov_fleet.cli_json("approvals", "approver", "remove", "gina")
    assert code != 0  # nothing left to remove


def test_submit_final_waits_past_the_approval_for_the_decided_run(gov_fleet: GovFleet) -> None:
    """``actionfleet submit --final``: the agent's command waits through
    ``awaiting_approval`` and prints the decided run's result."""
    action = parked_code()
    env = gov_fleet.env() | {"ACTIONFLEET_KEY": gov_fleet.key.secret()}
    submit = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "submit", json.dumps(action), "--final",
         "--timeout", "120"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    approval_id = f"acme+{action['action_id']}"
    try:
        wait_for(
            lambda: gov_fleet.cli("approvals", "show", approval_id).returncode == 0,
            60,
            "the action to be parked",
        )
        assert submit.poll() is None  # still waiting: parked is not final
        code, _ = gov_fleet.cli_json(
            "approvals", "approve", approval_id, "--reason", "ship it", "--as", "hana"
        )
        assert code == 0
        out, err = submit.communicate(timeout=150)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "succeeded" and result["action_id"] == action["action_id"]
    assert run_count(gov_fleet, action["action_id"]) == 1


def test_an_approved_external_email_is_delivered_once(gov_fleet: GovFleet) -> None:
    """The issue's example rule end to end: mail outside acme.com waits for a human, and
    once approved reaches the (loopback) SMTP server exactly once."""
    subject = f"approved-{uuid.uuid4().hex}"
    action = email("mailer", "a@acme.com", "x@partner.org")
    action["payload"] = dict(action["payload"], subject=subject)
    handle, approval_id = park(gov_fleet, action)

    def delivered() -> list[Any]:
        return [m for m in gov_fleet.smtp.received if subject.encode() in m.data]

    assert delivered() == []  # parked: nothing was sent
    code, _ = gov_fleet.cli_json(
        "approvals", "approve", approval_id, "--reason", "partner asked", "--as", "ivan"
    )
    assert code == 0
    result = handle.result(timeout=90, final=True)
    assert result.status == "succeeded", result
    assert [m.rcpt_tos for m in delivered()] == [["a@acme.com", "x@partner.org"]]


@pytest.mark.usefixtures("sandbox_image")
def test_an_approved_code_action_runs_once_in_a_real_sandbox(tmp_path: Path) -> None:
    """The approval path with the real code executor (a runc container on the tenant's
    workspace, mounted rw): nothing is written while the action waits, the approved run
    writes once."""
    fleet = make_fleet(tmp_path)
    try:
        fleet.start(queues="actions.code", test_probe_executor="0", sandbox_runtime="runc")
        source = (
            "import os\n"
            "path = '/workspace/approved.txt'\n"
            "runs = open(path).read() if os.path.exists(path) else ''\n"
            "open(path, 'w').write(runs + 'ran\\n')\n"
            "print('wrote', path)\n"
        )
        action = parked_code() | {
            "payload": {"language": "python", "source": source, "workspace": "rw"}
        }
        handle, approval_id = park(fleet, action)
        assert not list(fleet.workspace.rglob("approved.txt"))  # parked: nothing ran
        code, out = fleet.cli_json(
            "approvals", "approve", approval_id, "--reason", "reviewed", "--as", "alice"
        )
        assert code == 0 and out["status"] == "approved", out
        final = handle.result(timeout=180, final=True)
        assert final.ok and final.output is not None, final
        assert final.output["exit_code"] == 0 and "wrote" in final.output["stdout"], final
        written = list(fleet.workspace.rglob("approved.txt"))
        assert len(written) == 1 and written[0].read_text() == "ran\n"
    finally:
        fleet.close()
