"""Authenticated producers through a real files worker on a real redis-server: a signed
action runs; a changed byte, a changed tenant, an old timestamp, a reused nonce, a revoked
or rotated-out key, a key of another tenant and an unsigned action are each refused,
audited with the key id and the reason, and never run (the file the action would write
stays absent)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.auth import ProducerKey
from producer.client import ActionClient
from producer.models import ActionResult
from producer.transport import task_id_for
from tests.audit_fixtures import stream_rows
from tests.conftest import ROOT, RedisServer, Worker, start_worker, worker_env
from workers.auth.keys import KeyStore
from workers.config import Settings

pytestmark = pytest.mark.timeout(240)

DB = 6  # this module's own Redis database
OFF_DB = 5  # the auth-off worker's
CACHE_S = 0.2  # the workers' key cache: a revocation is seen after it


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Worker]]:
    redis_server.client(DB).flushdb()
    home = tmp_path_factory.mktemp("auth-fleet")
    url = redis_server.url(DB)
    worker = start_worker(
        url,
        home,
        queues="actions.files",
        concurrency=1,
        auth="required",
        auth_cache_s=str(CACHE_S),
        workspace_root=str(home / "ws"),
    )
    yield url, home / "ws", worker
    worker.stop()


@pytest.fixture
def store(fleet: tuple[str, Path, Worker]) -> Iterator[KeyStore]:
    client = redis.Redis.from_url(fleet[0])
    yield KeyStore(client)
    client.close()


def _write(tenant: str = "acme", agent: str = "researcher-1", path: str = "") -> dict[str, Any]:
    return {
        "primitive": "files",
        "tenant_id": tenant,
        "agent_id": agent,
        "action_id": str(uuid.uuid4()),
        "payload": {"op": "write", "path": path or f"m-{uuid.uuid4().hex}.txt", "content": "x"},
    }


def _send_raw(
    url: str, message: dict[str, Any], timeout: float = 60, task_id: str | None = None
) -> ActionResult:
    """Publish a message exactly as given (no validation, no signing): what a forger or a
    replaying attacker with broker access can do."""
    with ActionClient(url, settings=Settings(broker_url=url), key=None) as client:
        client.key = None
        result = client._app.send_task(
            "actionfleet.files",
            kwargs={"message": message},
            queue="actions.files",
            declare=[],
            task_id=task_id or task_id_for(message["tenant_id"], message["action_id"]),
        )
        value = result.get(timeout=timeout, propagate=False)
    return ActionResult.model_validate(value)


def _marker(workspace: Path, message: dict[str, Any]) -> Path:
    return workspace / message["tenant_id"] / message["payload"]["path"]


def _audit_rows(url: str, action_id: str) -> list[dict[str, Any]]:
    return stream_rows(url, action_id)


def _wait_audit(
    url: str, action_id: str, stage: str = "finished", count: int = 1
) -> list[dict[str, Any]]:
    """The action's audit rows once ``count`` of them are of ``stage`` (the events are
    streamed after the result is stored: a result in hand does not mean its event is)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = _audit_rows(url, action_id)
        if sum(r["stage"] == stage for r in rows) >= count:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} {stage} audit events for {action_id}")


def _refused(
    url: str, workspace: Path, message: dict[str, Any], error_type: str, reason: str
) -> ActionResult:
    result = _send_raw(url, message)
    assert result.status == "denied", result
    assert result.error is not None and result.error.type == error_type, result.error
    assert result.error.details["reason"] == reason, result.error
    assert not _marker(workspace, message).exists(), "a refused action ran"
    rows = _wait_audit(url, message["action_id"])
    # A replay or a stale signature is refused at admission, after policy allowed it:
    # its trace shows that allow, then the deny.
    denies = [r for r in rows if r["stage"] == "policy" and r["policy_decision"] == "deny"]
    assert len(denies) == 1, rows
    assert result.error.message in denies[0]["policy_reason"]
    claimed = (message.get("auth") or {}).get("key_id", "")
    assert {r["key_id"] for r in rows} == {claimed}, rows
    assert not any(r["stage"] == "started" for r in rows), rows
    return result


def test_a_signed_action_runs_and_its_key_is_audited(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    url, workspace, _ = fleet
    record, key = store.create("acme", "researcher-*", ["files"])
    message = _write()
    with ActionClient(url, settings=Settings(broker_url=url), key=key.secret()) as client:
        result = client.run(message, timeout=60)
    assert result.status == "succeeded", result
    assert _marker(workspace, message).read_text() == "x"
    rows = _wait_audit(url, message["action_id"])
    assert {r["key_id"] for r in rows} == {record.key_id}
    assert [r["stage"] for r in rows] == ["received", "policy", "started", "finished"]


def test_tampered_stale_replayed_and_unsigned_actions_never_run(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    url, workspace, _ = fleet
    _, key = store.create("acme", "researcher-*", ["files"])

    # One payload byte changed after signing.
    signed = key.sign(_write())
    tampered = json.loads(json.dumps(signed))
    tampered["payload"]["content"] = "y"
    _refused(url, workspace, tampered, "unauthenticated", "bad_signature")

    # The tenant changed after signing (to one the key could not sign for anyway).
    moved = key.sign(_write())
    moved = {**moved, "tenant_id": "beta"}
    _refused(url, workspace, moved, "unauthenticated", "bad_signature")

    # Signed ten minutes ago (the allowed skew is five).
    stale_ms = int((datetime.now(UTC) - timedelta(minutes=10)).timestamp() * 1000)
    _refused(
        url, workspace, key.sign(_write(), now_ms=stale_ms), "unauthenticated", "stale_timestamp"
    )

    # A nonce already used, by a validly signed action, for another action.
    first = key.sign(_write())
    assert _send_raw(url, first).status == "succeeded"
    reuse = key.sign(_write(), nonce=first["auth"]["nonce"])
    _refused(url, workspace, reuse, "unauthenticated", "replay")

    # No signature at all.
    _refused(url, workspace, _write(), "unauthenticated", "missing")

    # A key this fleet never made.
    _refused(
        url, workspace, ProducerKey.generate().sign(_write()), "unauthenticated", "unknown_key"
    )


def test_a_batch_signed_as_one_tree_runs_and_each_member_proves_only_itself(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    """``submit_many`` signs one Merkle root per batch; the worker (one process: the root it
    verified is cached) still checks every member's own bytes and path to that root."""
    url, workspace, _ = fleet
    record, key = store.create("acme", "researcher-*", ["files"])
    messages = [_write() for _ in range(5)]
    with ActionClient(url, settings=Settings(broker_url=url), key=key.secret()) as client:
        handles = client.submit_many(messages)
        results = [h.result(timeout=60) for h in handles]
    assert [r.status for r in results] == ["succeeded"] * 5, results
    assert all(_marker(workspace, m).read_text() == "x" for m in messages)
    assert {r["key_id"] for r in _wait_audit(url, messages[4]["action_id"])} == {record.key_id}

    batch = key.sign_many([_write() for _ in range(6)])
    assert len({m["auth"]["sig"] for m in batch}) == 1  # one signature for the batch
    # An authentic member first, so the worker holds the verified root...
    assert _send_raw(url, batch[0]).status == "succeeded"
    # ... which does not let a changed sibling through,
    tampered = json.loads(json.dumps(batch[1]))
    tampered["payload"]["content"] = "y"
    _refused(url, workspace, tampered, "unauthenticated", "bad_signature")
    # nor a member's proof moved onto another message of the batch,
    swapped = {**batch[2], "auth": batch[3]["auth"]}
    _refused(url, workspace, swapped, "unauthenticated", "bad_signature")
    # nor a proof with its leaf position or path cut changed.
    moved = {**batch[4], "auth": {**batch[4]["auth"], "index": 5}}
    _refused(url, workspace, moved, "unauthenticated", "bad_signature")
    shorter = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(batch[5]["auth"]["path"] + "==")[:-32]
    ).decode()
    cut = {**batch[5], "auth": {**batch[5]["auth"], "path": shorter.rstrip("=")}}
    _refused(url, workspace, cut, "unauthenticated", "bad_signature")
    # The root is still good for its untouched members.
    assert _send_raw(url, batch[3]).status == "succeeded"
    # Another key's batch claiming this key id: the cached root is this key's, not its.
    forged = ProducerKey(record.key_id, ProducerKey.generate()._seed).sign_many(
        [_write() for _ in range(2)]
    )
    _refused(url, workspace, forged[0], "unauthenticated", "bad_signature")


def test_an_exact_copy_of_an_accepted_message_does_not_run_again(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    """A verbatim resend is the same action (same id, nonce, signature): answered from its
    stored result, not run a second time."""
    url, workspace, _worker = fleet
    _, key = store.create("acme", "researcher-*", ["files"])
    message = key.sign(_write())
    first = _send_raw(url, message)
    assert first.status == "succeeded"
    path = _marker(workspace, message)
    path.unlink()
    again = _send_raw(url, message)
    assert again.status == "succeeded" and again.action_id == first.action_id
    assert not path.exists(), "the copy ran again"
    rows = _wait_audit(url, message["action_id"], count=2)
    finished = [r for r in rows if r["stage"] == "finished"]
    assert [r["policy_decision"] for r in finished] == ["allow", "duplicate"], rows


def test_key_scope_revocation_and_rotation(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    url, workspace, _ = fleet
    record, key = store.create("acme", "researcher-*", ["files"])

    # A key of another tenant, and an agent outside the key's pattern.
    _, beta_key = store.create("beta", "*", ["files"])
    _refused(url, workspace, beta_key.sign(_write("acme")), "policy_denied", "key_scope")
    _refused(url, workspace, key.sign(_write(agent="writer-1")), "policy_denied", "key_scope")
    _, code_only = store.create("acme", "*", ["code"])
    _refused(url, workspace, code_only.sign(_write()), "policy_denied", "key_scope")

    # Rotation: the old key works during the grace window, the new one at once.
    new, new_key, old = store.rotate(record.key_id, grace_s=3600)
    assert old.replaced_by == new.key_id and old.state() == "expiring"
    assert _send_raw(url, key.sign(_write())).status == "succeeded"
    assert _send_raw(url, new_key.sign(_write())).status == "succeeded"
    # ... and not after it (its end moved to the past, as time would).
    store.expire(record.key_id, datetime.now(UTC) - timedelta(seconds=1))
    time.sleep(CACHE_S * 2)  # past the workers' key cache
    late = _refused(url, workspace, key.sign(_write()), "unauthenticated", "expired")
    assert new.key_id in late.error.message  # type: ignore[union-attr]
    assert _send_raw(url, new_key.sign(_write())).status == "succeeded"

    # Revocation.
    store.revoke(new.key_id)
    time.sleep(CACHE_S * 2)
    _refused(url, workspace, new_key.sign(_write()), "unauthenticated", "revoked")


def test_keys_cli_shows_the_secret_once_and_never_lists_it(
    fleet: tuple[str, Path, Worker], tmp_path: Path
) -> None:
    url, _workspace, _ = fleet
    env = worker_env(url, tmp_path) | {"ACTIONFLEET_ADMIN_URL": url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.ops.cli", "keys", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = cli("create", "--tenant", "acme", "--agent", "researcher-*", "--primitives", "files,code")
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["primitives"] == ["files", "code"] and "shown once" in out.stderr
    secret = created["secret"]
    listed = cli("list")
    assert listed.returncode == 0 and secret not in listed.stdout
    assert created["key_id"] in listed.stdout and "redis_password_sha256" not in listed.stdout
    # The printed secret signs actions the fleet accepts.
    with ActionClient(url, settings=Settings(broker_url=url), key=secret) as client:
        assert client.run(_write(), timeout=60).status == "succeeded"
    bad = cli("create", "--tenant", "acme", "--primitives", "teleport")
    assert bad.returncode == 2 and "primitives must be some of" in bad.stderr
    rotated = json.loads(cli("rotate", created["key_id"], "--grace", "30m").stdout)
    assert rotated["secret"] != secret and rotated["replaces"]["state"] == "expiring"
    revoked = json.loads(cli("revoke", rotated["key_id"]).stdout)
    assert revoked["state"] == "revoked"
    listed_ids = [k["key_id"] for k in json.loads(cli("list").stdout)]
    assert created["key_id"] in listed_ids and rotated["key_id"] not in listed_ids
    assert rotated["key_id"] in [k["key_id"] for k in json.loads(cli("list", "--all").stdout)]


def test_with_auth_off_unsigned_actions_run_and_the_worker_says_so(
    redis_server: RedisServer, tmp_path: Path, make_client: Callable[[str], ActionClient]
) -> None:
    url = redis_server.url(OFF_DB)  # not the module fleet's queue: it requires signatures
    redis_server.client(OFF_DB).flushdb()
    worker = start_worker(
        url,
        tmp_path,
        queues="actions.files",
        concurrency=1,
        auth="off",
        workspace_root=str(tmp_path / "ws"),
        name=f"authoff-{uuid.uuid4().hex[:6]}@localhost",
    )
    try:
        message = _write(path="off.txt")
        result = _send_raw(url, message)
        assert result.status == "succeeded", result
        assert (tmp_path / "ws" / "acme" / "off.txt").exists()
        assert "ACTIONFLEET_AUTH=off" in worker.log.read_text()
    finally:
        worker.stop()


def test_a_message_cannot_write_its_result_over_another_tenants(
    fleet: tuple[str, Path, Worker], store: KeyStore
) -> None:
    """Results are kept per tenant (task id ``tenant+action_id``); a message sent under
    another action's task id is refused, runs nothing, and stores nothing there."""
    url, workspace, _ = fleet
    _, beta_key = store.create("beta", "*", ["files"])
    _, acme_key = store.create("acme", "*", ["files"])
    with ActionClient(url, settings=Settings(broker_url=url), key=beta_key.secret()) as beta:
        victim = beta.submit(_write("beta"))
        assert victim.result(timeout=60).status == "succeeded"
        victim_task = task_id_for("beta", victim.action_id)
        assert victim._async.id == victim_task
    client = redis.Redis.from_url(url)
    stored = client.get(f"celery-task-meta-{victim_task}")
    attack = acme_key.sign(_write("acme"))
    with ActionClient(url, settings=Settings(broker_url=url), key=None) as raw:
        raw._app.send_task(
            "actionfleet.files",
            kwargs={"message": attack},
            queue="actions.files",
            declare=[],
            task_id=victim_task,
        )
    rows = _wait_audit(url, attack["action_id"])
    finished = [r for r in rows if r["stage"] == "finished"]
    assert finished and finished[0]["status"] == "invalid", rows
    assert f"came as task {victim_task!r}" in finished[0]["error_message"], finished
    assert client.get(f"celery-task-meta-{victim_task}") == stored
    assert not _marker(workspace, attack).exists()
    client.close()


def test_the_replay_check_on_its_own_round_trip(fleet: tuple[str, Path, Worker]) -> None:
    """Without an admission script (a pipeline without the reliability guard) the
    authenticator makes the same nonce checks itself."""
    from producer.errors import Unauthenticated
    from producer.validation import parse_action
    from workers.auth.verify import Authenticator

    client = redis.Redis.from_url(fleet[0])
    auth = Authenticator(client, cache_s=0)
    _, key = KeyStore(client).create("acme", "*", ["files"])
    first = key.sign(_write())
    assert auth.authenticate(parse_action(first), first) is not None
    # The same action again (a redelivery), even long after: accepted.
    later = datetime.now(UTC) + timedelta(hours=2)
    assert auth.authenticate(parse_action(first), first, later) is not None
    reuse = key.sign(_write(), nonce=first["auth"]["nonce"])
    with pytest.raises(Unauthenticated) as replay:
        auth.authenticate(parse_action(reuse), reuse)
    assert replay.value.details["reason"] == "replay"
    an_hour_ago = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    old = key.sign(_write(), now_ms=an_hour_ago)
    with pytest.raises(Unauthenticated) as stale:
        auth.authenticate(parse_action(old), old)
    assert stale.value.details["reason"] == "stale_timestamp"
    fresh = key.sign(_write())
    deferred = auth.authenticate(parse_action(fresh), fresh, defer_nonce=True)
    assert deferred is not None and deferred.nonce is not None and deferred.nonce.fresh
    client.close()
