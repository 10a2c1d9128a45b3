"""Workflows through a real fleet: redis-server, Celery workers with signatures required
(files + email + the workflow engine in one, code in Docker containers in another), the
producer's own key, the audit trail in real chDB. A 4-step workflow (files write -> code
on the workspace -> files read -> email dry run) succeeds; with step 3 failing its
compensations run newest first; with the code worker SIGKILLed during step 2 it resumes
and step 1 does not run again."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from audit.ingester import Ingester
from audit.store import ClientReader
from producer.auth import ProducerKey
from producer.client import ActionClient
from producer.workflows import (
    WorkflowHandle,
    WorkflowSpec,
    cancel_workflow,
    ref,
    step_action_id,
    submit_workflow,
)
from tests.audit_fixtures import chdb_available, drain
from tests.conftest import RedisServer, Worker, start_worker
from tests.reliability_fixtures import fresh_url
from workers.auth.keys import KeyStore
from workers.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TENANT = "apitest"  # the test policy lets it dry-run mail to example.com
ENGINE_QUEUES = "actions.files,actions.email,actions.workflow"


def _worker(url: str, home: Path, queues: str, **extra: str) -> Worker:
    """A worker of this fleet: signatures required, the shared workspace (under the
    fleet's home), a short visibility timeout so a killed worker's actions come back."""
    workspace = home.parent / "ws"
    return start_worker(
        url, home, queues=queues, auth="required", workspace_root=str(workspace),
        visibility_timeout_s="90", lease_s="2", **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(
    redis_own: RedisServer, sandbox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("wf-fleet")
    url = fresh_url(redis_own, 3)
    engine = _worker(url, home / "engine", ENGINE_QUEUES)
    code = _worker(url, home / "code", "actions.code", sandbox_runtime="runc")
    _, key = KeyStore(redis.Redis.from_url(url)).create(TENANT, "*")
    client = ActionClient(url, settings=Settings(broker_url=url), key=key.secret())
    state = {"url": url, "home": home, "client": client, "engine": engine, "code": code}
    yield state
    client.close()
    for worker in (state["code"], state["engine"]):
        worker.stop()


def _spec(read_path: str = "out.txt", sleep_s: float = 0.0, timeout_s: int = 20) -> WorkflowSpec:
    wid = str(uuid.uuid4())
    source = (
        f"import time; time.sleep({sleep_s})\n"
        "text = open('/workspace/wf/in.txt').read()\n"
        "open('/workspace/wf/out.txt', 'w').write(text.upper())\n"
        "print(len(text))\n"
    )
    return WorkflowSpec.model_validate(
        {
            "workflow_id": wid,
            "name": "write-process-read-mail",
            "tenant_id": TENANT,
            "agent_id": "wf-agent",
            "deadline_s": 300,
            "steps": [
                {
                    "id": "write",
                    "action": {
                        "primitive": "files",
                        "payload": {"op": "write", "path": "wf/in.txt", "content": wid},
                    },
                    "compensate": {
                        "primitive": "files",
                        "payload": {"op": "delete", "path": "wf/in.txt"},
                    },
                },
                {
                    "id": "process",
                    "action": {
                        "primitive": "code",
                        "payload": {
                            "language": "python",
                            "source": source,
                            "workspace": "rw",
                            "timeout_s": timeout_s,
                        },
                    },
                    "compensate": {
                        "primitive": "files",
                        "payload": {"op": "delete", "path": "wf/out.txt"},
                    },
                },
                {
                    "id": "read",
                    "action": {
                        "primitive": "files",
                        "payload": {"op": "read", "path": f"wf/{read_path}"},
                    },
                    "when": {"step": "process", "status": ["succeeded"]},
                },
                {
                    "id": "mail",
                    "action": {
                        "primitive": "email",
                        "payload": {
                            "to": ["ops@example.com"],
                            "subject": "processed",
                            "text": ref("steps.read.output.content"),
                            "dry_run": True,
                        },
                    },
                },
            ],
        }
    )


def _wait(client: ActionClient, spec: WorkflowSpec, timeout: float = 240) -> dict[str, Any]:
    return submit_workflow(client, spec).wait(timeout)


def _result(client: ActionClient, spec: WorkflowSpec, step: str, phase: str = "run") -> Any:
    from producer.transport import task_id_for

    task = task_id_for(spec.tenant_id, step_action_id(spec.workflow_id, step, phase))
    return client.async_result(task).get(timeout=30)


def _result_or_none(client: ActionClient, spec: WorkflowSpec, step: str) -> Any:
    from producer.transport import task_id_for

    task = task_id_for(spec.tenant_id, step_action_id(spec.workflow_id, step, "run"))
    return client.async_result(task).backend.get_task_meta(task, cache=False).get("result")


def test_four_steps_succeed_with_refs_and_every_step_audited(fleet: dict[str, Any]) -> None:
    client: ActionClient = fleet["client"]
    spec = _spec()
    final = _wait(client, spec)
    assert final["status"] == "succeeded", final
    assert [s["status"] for s in final["steps"]] == ["succeeded"] * 4
    assert final["key_id"] == client.key.key_id  # type: ignore[union-attr]
    mail = _result(client, spec, "mail")
    # Step 4's text is step 3's output (a $ref), which is what step 2 computed.
    assert mail["output"]["dry_run"] is True and mail["output"]["would_be_allowed"] is True
    read = _result(client, spec, "read")
    assert read["output"]["content"] == spec.workflow_id.upper()
    code = _result(client, spec, "process")
    assert code["output"]["stdout"].strip() == str(len(spec.workflow_id))


def test_a_failing_step_runs_the_compensations_newest_first(fleet: dict[str, Any]) -> None:
    client: ActionClient = fleet["client"]
    spec = _spec(read_path="missing.txt")
    final = _wait(client, spec)
    assert final["status"] == "failed" and "read" in final["reason"], final
    steps = {s["id"]: s for s in final["steps"]}
    assert steps["read"]["status"] == "failed" and steps["read"]["error"]["type"] == "not_found"
    assert steps["mail"]["status"] == "pending"  # never sent
    assert steps["process"]["compensation"]["status"] == "succeeded"
    assert steps["write"]["compensation"]["status"] == "succeeded"
    undo_out = _result(client, spec, "process", "compensate")
    undo_in = _result(client, spec, "write", "compensate")
    assert undo_out["finished_at"] < undo_in["started_at"]  # reverse order, one at a time
    ws = Path(fleet["home"]) / "ws"
    assert not list(ws.rglob("wf/in.txt")) and not list(ws.rglob("wf/out.txt"))


def _while_processing(client: ActionClient, spec: WorkflowSpec) -> WorkflowHandle:
    """Start ``spec`` and return once its code step (which sleeps) is running."""
    handle = submit_workflow(client, spec)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = handle.status()
        steps = {s["id"]: s for s in (status or {}).get("steps", [])}
        if steps.get("process", {}).get("status") == "running":
            return handle
        time.sleep(0.2)
    raise AssertionError(f"step 2 never ran: {handle.status()}")


def test_a_cancelled_workflow_stops_and_undoes_what_it_did(fleet: dict[str, Any]) -> None:
    client: ActionClient = fleet["client"]
    # The step sleeps long enough that the cancel lands while it runs, however slow the
    # machine (the engine waits for a step still out before it compensates).
    spec = _spec(sleep_s=25, timeout_s=60)
    handle = _while_processing(client, spec)
    cancel_workflow(client, TENANT, spec.workflow_id)
    final = handle.wait(180)
    assert final["status"] == "cancelled", final
    steps = {s["id"]: s for s in final["steps"]}
    assert steps["read"]["status"] == "pending" and steps["mail"]["status"] == "pending"
    assert steps["write"]["compensation"]["status"] == "succeeded", steps
    assert not list((Path(fleet["home"]) / "ws").rglob("wf/in.txt"))


def test_a_workflow_past_its_deadline_times_out_and_compensates(fleet: dict[str, Any]) -> None:
    client: ActionClient = fleet["client"]
    spec = _spec(sleep_s=8).model_copy(update={"deadline_s": 3.0})
    final = _wait(client, spec, timeout=180)
    assert final["status"] == "timed_out" and "deadline" in final["reason"], final
    steps = {s["id"]: s for s in final["steps"]}
    assert steps["mail"]["status"] == "pending"
    assert steps["write"]["compensation"]["status"] == "succeeded", steps


def test_code_worker_killed_during_step_two_resumes_without_repeating_step_one(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    chdb_available()
    client: ActionClient = fleet["client"]
    code: Worker = fleet["code"]
    spec = _spec(sleep_s=4.0)
    handle = _while_processing(client, spec)  # step 2 is running in a container
    time.sleep(1.5)
    for pid in [*code.pool_pids(), code.proc.pid]:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    code.proc.wait(10)
    # What an operator's `actionfleet sandbox reap` does: the dead worker's containers
    # (its warm pool, the interrupted step's) go now rather than at the next reaper pass.
    from sandboxes.docker import DockerSandbox

    reaper = DockerSandbox()
    try:
        reaper.reap()
    finally:
        reaper.close()
    # A new code worker: the killed one's unacked step comes back after the visibility
    # timeout (90 s here; kombu sweeps at a quarter of it).
    fleet["code"] = _worker(
        fleet["url"], fleet["home"] / "code2", "actions.code", sandbox_runtime="runc"
    )
    final = handle.wait(400)
    assert final["status"] == "succeeded", final
    # Step 1 ran once: one executed result in the audit store (the engine never sent it
    # again; had it, its idempotency key would have answered from the record).
    first = step_action_id(spec.workflow_id, "write")
    ingester = Ingester(fleet["url"], f"chdb://{tmp_path / 'audit'}", serve_queries=False)
    try:
        drain(ingester, timeout=120)
        reader = ClientReader(ingester.client, own=False)
        rows = reader.query(
            "SELECT labels['workflow_step'] AS step, count() AS n FROM actionfleet.action_results "
            f"WHERE labels['workflow_id'] = '{spec.workflow_id}' GROUP BY step ORDER BY step"
        ).rows
        runs = {step: int(n) for step, n in rows}
        assert runs["write"] == 1, runs
        assert set(runs) == {"write", "process", "read", "mail"}, runs
        ids = reader.query(
            f"SELECT count() FROM actionfleet.action_results WHERE action_id = '{first}'"
        ).rows
        assert int(ids[0][0]) == 1
        # Every step is audited as the key the workflow was signed with (by its grant).
        keys = reader.query(
            "SELECT DISTINCT key_id FROM actionfleet.action_results "
            f"WHERE labels['workflow_id'] = '{spec.workflow_id}'"
        ).rows
        assert keys == [[client.key.key_id]] or keys == [(client.key.key_id,)], keys
        # `actionfleet audit trace <workflow id>`: every stage of every step of the run.
        from audit import reports

        events = reports.trace(reader, spec.workflow_id)
        assert {e["labels"]["workflow_step"] for e in events} == set(runs)
        assert {e["stage"] for e in events} >= {"received", "policy", "started", "finished"}
    finally:
        ingester.close()


def test_engine_worker_killed_mid_workflow_resumes_from_redis(fleet: dict[str, Any]) -> None:
    """The engine's own worker (it also serves files and email) is SIGKILLed while step 2
    runs: a new one picks the workflow up from its state in Redis (the killed worker's
    unacked ``advance`` comes back after the visibility timeout) and the workflow
    succeeds, step 1 not sent again."""
    client: ActionClient = fleet["client"]
    engine: Worker = fleet["engine"]
    spec = _spec(sleep_s=3.0)
    handle = _while_processing(client, spec)
    first = _result(client, spec, "write")
    for pid in [*engine.pool_pids(), engine.proc.pid]:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    engine.proc.wait(10)
    fleet["engine"] = _worker(fleet["url"], fleet["home"] / "engine2", ENGINE_QUEUES)
    final = handle.wait(400)
    assert final["status"] == "succeeded", final
    assert [s["status"] for s in final["steps"]] == ["succeeded"] * 4, final
    # Step 1's stored result is the one from before the kill (its own start and finish
    # times): it did not run again.
    assert _result(client, spec, "write") == first


def test_a_step_message_without_the_engines_grant_is_refused(fleet: dict[str, Any]) -> None:
    """A producer forging a workflow step (no signature, a workflow reference) gets
    nothing run: only the engine's grant makes an unsigned step acceptable."""
    client: ActionClient = fleet["client"]
    path = f"forged-{uuid.uuid4().hex}.txt"
    action = client.validate(
        {
            "primitive": "files",
            "tenant_id": TENANT,
            "agent_id": "wf-agent",
            "workflow": {"id": str(uuid.uuid4()), "step": "write"},
            "payload": {"op": "write", "path": path, "content": "x"},
        }
    )
    key, client.key = client.key, None  # sent unsigned, as a forger would
    try:
        result = client.send(action).result(timeout=60)
    finally:
        client.key = key
    assert result.status == "denied" and result.error is not None
    assert result.error.type == "unauthenticated" and "grant" in result.error.message
    assert not list((Path(fleet["home"]) / "ws").rglob(path))


def test_a_workflow_the_fleet_refuses_says_why_and_runs_nothing(fleet: dict[str, Any]) -> None:
    """Signed by a key this fleet never made: the producer waiting on it hears ``refused``
    with the reason at once, and no step runs."""
    url = fleet["url"]
    stranger = ActionClient(url, settings=Settings(broker_url=url), key=ProducerKey.generate())
    spec = _spec()
    try:
        status = submit_workflow(stranger, spec).wait(120)
    finally:
        stranger.close()
    assert status["status"] == "refused" and "unknown" in status["reason"], status
    assert status["steps"] == []
    assert _result_or_none(fleet["client"], spec, "write") is None


def test_the_workflow_file_runs_from_the_command_line(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    import os
    import sys

    import yaml

    from tests.conftest import ROOT

    spec = _spec()
    path = tmp_path / "wf.yaml"  # YAML, as an operator writes it (JSON: the other tests)
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {
        "ACTIONFLEET_BROKER_URL": fleet["url"],
        "ACTIONFLEET_KEY": fleet["client"].key.secret(),
        "ACTIONFLEET_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "workflow",
            "run",
            str(path),
            "--wait",
            "--timeout",
            "240",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "succeeded"

    def workflow(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "producer.cli", "workflow", *args, "--tenant", TENANT]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    status = workflow("status", spec.workflow_id)
    assert status.returncode == 0 and json.loads(status.stdout)["workflow_id"] == spec.workflow_id
    cancel = workflow("cancel", spec.workflow_id)
    assert cancel.returncode == 0, cancel.stderr  # a finished workflow stays as it ended
    time.sleep(1.0)
    after = workflow("status", spec.workflow_id)
    assert json.loads(after.stdout)["status"] == "succeeded"
