"""The Redis start script of the compose and Kubernetes deployments
(k8s/base/redis-start.sh) makes the same service users as ``actionfleet up``
(workers/auth/acl.py), keeps the producer users a running Redis saved, and really starts
a redis-server whose default user is off."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT
from tests.services import require
from workers.auth.acl import ServicePasswords, service_acl_lines
from workers.ops.fleet import free_port

SCRIPT = ROOT / "k8s" / "base" / "redis-start.sh"


def test_the_script_writes_the_users_acl_py_defines(tmp_path: Path) -> None:
    passwords = ServicePasswords("admin-pw", "worker-pw")
    acl = tmp_path / "users.acl"
    acl.write_text("user p-k0123456789abcdef on #abc ~actions.* -@all +lpush\nuser stale on\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "redis-server").write_text('#!/bin/sh\necho "$@" > "$AF_ARGS"\n')
    (fake / "redis-server").chmod(0o755)
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "AF_REDIS_ADMIN_PASSWORD": passwords.admin,
        "AF_REDIS_WORKER_PASSWORD": passwords.worker,
        "AF_REDIS_ACLFILE": str(acl),
        "AF_ARGS": str(tmp_path / "args"),
    }
    subprocess.run(["sh", str(SCRIPT), "--port", "1"], env=env, check=True, timeout=30)
    lines = acl.read_text().splitlines()
    assert lines[:3] == service_acl_lines(passwords)
    assert lines[3:] == ["user p-k0123456789abcdef on #abc ~actions.* -@all +lpush"]
    assert (tmp_path / "args").read_text().split() == ["--aclfile", str(acl), "--port", "1"]
    assert acl.stat().st_mode & 0o777 == 0o600
    sha = hashlib.sha256(b"worker-pw").hexdigest()
    assert re.search(rf"^user af-worker on #{sha} ", acl.read_text(), re.M)


def test_the_script_refuses_to_start_without_passwords(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "AF_REDIS_ACLFILE": str(tmp_path / "users.acl")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "AF_REDIS_ADMIN_PASSWORD" in out.stderr


def test_a_real_redis_started_by_the_script(tmp_path: Path) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    port = free_port()
    env = dict(
        os.environ,
        AF_REDIS_ADMIN_PASSWORD="admin-pw",
        AF_REDIS_WORKER_PASSWORD="worker-pw",
        AF_REDIS_ACLFILE=str(tmp_path / "users.acl"),
    )
    proc = subprocess.Popen(
        ["sh", str(SCRIPT), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        worker = redis.Redis(port=port, username="af-worker", password="worker-pw")
        deadline = time.monotonic() + 15
        while True:
            try:
                assert worker.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            worker.flushall()
        admin = redis.Redis(port=port, username="af-admin", password="admin-pw")
        assert admin.execute_command("ACL WHOAMI") in (b"af-admin", "af-admin")
    finally:
        proc.terminate()
        proc.wait(10)
