"""Broker access per party, on a real redis-server started with the fleet's ACL file:
a producer's user may push actions and read its own tenant's results, nothing more; the
workers' user does its whole job (fetch, ack, results, limits, audit) but cannot
administer or wipe Redis."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from producer.client import ActionClient
from producer.config import ProducerSettings, with_credentials
from tests.conftest import Worker, start_worker
from tests.services import require
from workers.auth.acl import (
    ADMIN_USER,
    WORKER_USER,
    ServicePasswords,
    apply_producer_users,
    service_acl_lines,
)
from workers.auth.keys import KeyStore
from workers.ops.fleet import free_port, redis_argv, write_private

pytestmark = pytest.mark.timeout(240)


@dataclass
class AclRedis:
    url: str  # no credentials
    admin_url: str
    worker_url: str
    proc: subprocess.Popen[bytes]

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.admin_url)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    exe = shutil.which("redis-server")
    require(exe is not None, "redis-server")
    assert exe is not None
    data = tmp_path_factory.mktemp("acl-redis")
    passwords = ServicePasswords()
    aclfile = data / "users.acl"
    write_private(aclfile, "\n".join(service_acl_lines(passwords)) + "\n")
    port = free_port()
    proc = subprocess.Popen(
        redis_argv(exe, port, data, aclfile=aclfile),
        stdout=(data / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    server = AclRedis(
        url,
        with_credentials(url, ADMIN_USER, passwords.admin),
        with_credentials(url, WORKER_USER, passwords.worker),
        proc,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            server.admin().ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, (data / "redis.log").read_text()
            time.sleep(0.1)
    yield server
    proc.terminate()
    proc.wait(10)


def _denied(call: object, *args: object) -> bool:
    try:
        call(*args)  # type: ignore[operator]
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_the_default_user_is_off(acl_redis: AclRedis) -> None:
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(acl_redis.url).ping()


def test_a_producer_may_push_actions_and_read_its_own_results_only(acl_redis: AclRedis) -> None:
    admin = acl_redis.admin()
    store = KeyStore(admin)
    _, acme = store.create("acme", "*", ["files"])
    _, beta = store.create("beta", "*", ["files"])
    apply_producer_users(admin, store.list())
    admin.set("celery-task-meta-beta+1", b"beta's result")
    admin.set("celery-task-meta-acme+1", b"acme's result")

    user, password = acme.redis_credentials()
    p = redis.Redis.from_url(with_credentials(acl_redis.url, user, password))
    assert p.lpush("actions.acl-test", b"a message") == 1
    assert p.get("celery-task-meta-acme+1") == b"acme's result"
    assert _denied(p.get, "celery-task-meta-beta+1")
    # A batch reads many results in one MGET: its own only, one other tenant's key denies all.
    assert p.mget(["celery-task-meta-acme+1", "celery-task-meta-acme+2"]) == [
        b"acme's result",
        None,
    ]
    assert _denied(p.mget, ["celery-task-meta-acme+1", "celery-task-meta-beta+1"])
    assert _denied(p.brpop, ["actions.acl-test"], 1)
    assert _denied(p.rpop, "actions.acl-test")
    assert _denied(p.lrange, "actions.acl-test", 0, -1)
    assert _denied(p.flushall)
    assert _denied(p.flushdb)
    assert _denied(p.keys, "*")
    assert _denied(p.hgetall, "af:auth:keys")
    assert _denied(p.xadd, "actionfleet:audit", {"e": b"{}"})
    assert _denied(p.set, "celery-task-meta-acme+1", b"forged")
    # Workflows: a producer hands one over on actions.workflow, and cannot write the
    # engine's state or the grants that let a step run unsigned (workers/auth/grants.py).
    assert p.lpush("actions.workflow", b"a workflow message") == 1
    assert _denied(p.set, "af:wf:grant:00000000-0000-0000-0000-000000000000:s:run", b"{}")
    assert _denied(p.hset, "af:wf:00000000-0000-0000-0000-000000000000", "status", "succeeded")
    assert _denied(p.execute_command, "ACL", "SETUSER", user, "+@all")
    sub = p.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        sub.subscribe("celery-task-meta-beta+1")
        sub.get_message(timeout=1)
    sub.close()

    # A revoked key loses its Redis user, and its open connection with it.
    store.revoke(acme.key_id)
    apply_producer_users(admin, store.list())
    with pytest.raises(redis.RedisError):
        p.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(with_credentials(acl_redis.url, user, password)).ping()
    # Beta's user is untouched.
    b_user, b_password = beta.redis_credentials()
    b = redis.Redis.from_url(with_credentials(acl_redis.url, b_user, b_password))
    assert b.get("celery-task-meta-beta+1") == b"beta's result"
    admin.delete("actions.acl-test")


@pytest.fixture(scope="module")
def acl_worker(
    acl_redis: AclRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Worker, Path]]:
    home = tmp_path_factory.mktemp("acl-worker")
    worker = start_worker(
        acl_redis.worker_url,
        home,
        queues="actions.files",
        concurrency=1,
        auth="required",
        workspace_root=str(home / "ws"),
    )
    yield worker, home / "ws"
    worker.stop()


def test_producers_and_the_worker_do_their_jobs_under_their_own_users(
    acl_redis: AclRedis, acl_worker: tuple[Worker, Path]
) -> None:
    worker, _ = acl_worker
    admin = acl_redis.admin()
    store = KeyStore(admin)
    _, acme = store.create("acme", "*", ["files"])
    _, beta = store.create("beta", "*", ["files"])
    apply_producer_users(admin, store.list())
    settings = ProducerSettings(broker_url=acl_redis.url, broker_auth="key")

    def write(tenant: str) -> dict[str, object]:
        return {
            "primitive": "files",
            "tenant_id": tenant,
            "agent_id": "a",
            "payload": {"op": "write", "path": f"{uuid.uuid4().hex}.txt", "content": "x"},
        }

    with ActionClient(settings=settings, key=beta) as client:
        beta_handle = client.submit(write("beta"))
        assert beta_handle.result(timeout=60).status == "succeeded"
    with ActionClient(settings=settings, key=acme) as client:
        assert client.broker_url.startswith(f"redis://p-{acme.key_id}:")
        result = client.run(write("acme"), timeout=60)
        assert result.status == "succeeded", (result, worker.tail())
        # ... and cannot read beta's real result.
        assert _denied(client._app.backend.client.get, f"celery-task-meta-{beta_handle._async.id}")
        # A batch reads its results with MGET; under a user made before MGET was granted
        # (an older fleet's ACL) it falls back to GETs.
        stats = [write("acme") | {"payload": {"op": "stat", "path": "."}} for _ in range(40)]
        assert {r.status for r in client.batch(stats, window=64)} == {"succeeded"}
        assert client._mget is True
        admin.execute_command("ACL", "SETUSER", f"p-{acme.key_id}", "-mget")
        assert {r.status for r in client.batch(stats, window=64)} == {"succeeded"}
        assert client._mget is False

        # Waiting on asyncio (ActionClient.arun) works under the producer's user too.
        async def on_asyncio() -> list[str]:
            results = await asyncio.gather(*(client.arun(write("acme"), 60) for _ in range(3)))
            await client.aclose()
            return [r.status for r in results]

        assert asyncio.run(on_asyncio()) == ["succeeded"] * 3

    # The workers' user ran all of that, and still may not administer or wipe Redis.
    w = redis.Redis.from_url(acl_redis.worker_url)
    assert _denied(w.flushall)
    assert _denied(w.execute_command, "ACL", "SETUSER", "p-x", "on", "+@all")
    assert _denied(w.config_get, "*")
    # ... and nothing else it tried was refused (the ACL log keeps every refusal).
    expected = ("flushall", "acl|setuser", "config|get")
    denials = [e for e in admin.acl_log() if e.get("username") == WORKER_USER]
    assert [d for d in denials if d.get("object") not in expected] == []
