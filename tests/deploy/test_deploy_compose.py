"""docker-compose: the file validates (Debian's docker-compose v1), has the properties the
fleet relies on, and the whole stack comes up HERE from locally built images, runs one
action per primitive, and goes away without leaving anything behind.

The smoke test runs the real images (deploy/build-images.sh, cached by content) on the real
engine, with deploy/docker-compose.local.yml (host network on loopback: this engine has no
bridge; the embedded audit store instead of a ClickHouse image, which cannot be pulled here)
plus a test-only override (the test policy, a loopback SMTP relay). Peers are real: an
aiosmtpd SMTP server and an HTTP server on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from producer.client import ActionClient
from producer.models import PRIMITIVES, queue_for
from tests.conftest import ROOT, TEST_POLICY, http_status
from tests.http_peer import json_peer
from tests.services import require
from workers.config import Settings
from workers.ops.fleet import free_port

COMPOSE = ROOT / "docker-compose.yml"
LOCAL = ROOT / "deploy" / "docker-compose.local.yml"
WORKERS = [f"worker-{p}" for p in PRIMITIVES]
SECRETS = {
    "CLICKHOUSE_PASSWORD": "ch-test-pw",
    "ACTIONFLEET_FLOWER_PASSWORD": "fl-test-pw",
    "AF_REDIS_ADMIN_PASSWORD": "admin-test-pw",
    "AF_REDIS_WORKER_PASSWORD": "worker-test-pw",
}


def compose_exe() -> str:
    exe = shutil.which("docker-compose")
    require(exe is not None, "docker-compose (Debian package docker-compose)")
    assert exe is not None
    return exe


def compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIONFLEET_", "AF_"))}
    return env | SECRETS | extra


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [compose_exe()]
    for f in files:
        argv += ["-f", str(f)]
    out = subprocess.run(
        [*argv, "config"],
        capture_output=True,
        text=True,
        env=env or compose_env(),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


# ------------------------------------------------------------------------------ validation


def text(value: str | list[str]) -> str:
    """A compose command/test as one string (the file may give either form)."""
    return value if isinstance(value, str) else " ".join(value)


def test_compose_file_validates_with_docker_compose_v1() -> None:
    cfg = compose_config(COMPOSE)
    services = cfg["services"]
    assert set(services) == {
        "redis",
        "clickhouse",
        "audit-ingester",
        "flower",
        "metrics",
        *WORKERS,
    }
    assert set(cfg["volumes"]) >= {"redis-data", "clickhouse-data", "audit-home", "worker-home"}
    # Workspaces: one host directory at the same path in the files and code workers.
    for name in ("worker-files", "worker-code"):
        svc = services[name]
        assert svc["user"] == "10001:10002", name
        binds = [str(v) for v in svc["volumes"] if "workspaces" in str(v)]
        assert binds and all(
            b.split(":")[0] == b.split(":")[1] == "/srv/actionfleet/workspaces" for b in binds
        ), binds
    redis_cmd = text(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    # Redis starts with the fleet's ACL users; every service logs in as af-worker.
    assert services["redis"]["entrypoint"] == ["sh", "/etc/actionfleet/redis-start.sh"]
    assert "--user af-worker" in text(services["redis"]["healthcheck"]["test"])
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if "ACTIONFLEET_BROKER_URL" in env:
            assert env["ACTIONFLEET_BROKER_URL"].startswith("redis://af-worker:"), name
            assert env["ACTIONFLEET_AUTH"] == "required", name
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped", name
        assert "healthcheck" in svc or name in {"audit-ingester", "flower", "metrics"}, name
        assert svc.get("mem_limit") and svc.get("cpus"), name
    for name in WORKERS:
        svc = services[name]
        queues = name.removeprefix("worker-")
        queues += ",workflow" if queues == "files" else ""  # the workflow engine's queue too
        assert svc["command"][:3] == ["worker", "--queues", queues]
        assert "inspect ping -d celery@$$HOSTNAME" in text(svc["healthcheck"]["test"]) or (
            "inspect ping -d celery@$HOSTNAME" in text(svc["healthcheck"]["test"])
        )
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert svc["stop_signal"] == "SIGTERM" and svc["stop_grace_period"] == "330s"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # Only the code worker gets the (root-equivalent) Docker socket.
    with_socket = {
        n for n, s in services.items() if any("docker.sock" in str(v) for v in s.get("volumes", []))
    }
    assert with_socket == {"worker-code"}
    for name in ("flower", "metrics"):
        (port,) = services[name]["ports"]
        assert str(port).startswith("127.0.0.1:") or port.get("host_ip") == "127.0.0.1", port


def test_compose_refuses_to_start_without_passwords() -> None:
    env = {k: v for k, v in compose_env().items() if k not in SECRETS}
    out = subprocess.run(
        [compose_exe(), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert any(name in out.stderr for name in SECRETS), out.stderr


def test_local_override_validates() -> None:
    cfg = compose_config(COMPOSE, LOCAL, env=compose_env(AF_REDIS_PORT="16380"))
    services = cfg["services"]
    for name, svc in services.items():
        assert svc["network_mode"] == "host", name
        if svc.get("scale", 1) > 0:
            assert not svc.get("ports"), name  # published ports conflict with host network
    assert services["clickhouse"]["scale"] == 0
    assert services["flower"]["scale"] == 0 and services["metrics"]["scale"] == 0
    ingester = services["audit-ingester"]["environment"]
    assert ingester["ACTIONFLEET_CLICKHOUSE_DSN"] == "chdb:///var/lib/actionfleet/audit"
    for name in WORKERS:
        env = services[name]["environment"]
        assert env["ACTIONFLEET_BROKER_URL"] == "redis://af-worker:worker-test-pw@127.0.0.1:16380/0"
    assert "--bind 127.0.0.1 --port 16380" in text(services["redis"]["command"])
    assert services["redis"]["entrypoint"] == ["sh", "/etc/actionfleet/redis-start.sh"]


# ---------------------------------------------------------------------------------- smoke


@pytest.fixture
def http_peer() -> Iterator[int]:
    with json_peer() as port:
        yield port


@pytest.fixture
def smtp_peer() -> Iterator[tuple[int, list[Any]]]:
    from aiosmtpd.controller import Controller

    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, received
    controller.stop()


def build_images(*extra: str) -> dict[str, str]:
    require(shutil.which("debootstrap") is not None, "debootstrap (Debian package)")
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-images.sh"), "--redis", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1500,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    images: dict[str, str] = {}
    for line in (ROOT / "deploy" / "images.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            images[key] = value
    return images


def _actions(http_port: int) -> dict[str, dict[str, Any]]:
    def action(primitive: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "primitive": primitive,
            "tenant_id": "apitest",
            "agent_id": "smoke",
            "payload": payload,
        }

    return {
        "code": action("code", {"language": "python", "source": "print(6 * 7)"}),
        "files": action("files", {"op": "write", "path": "smoke/hello.txt", "content": "hi"}),
        "api": action("api", {"method": "GET", "url": f"http://127.0.0.1:{http_port}/health"}),
        "email": action(
            "email", {"to": ["ops@example.com"], "subject": "smoke", "text": "from compose"}
        ),
        "browse": action("browse", {"url": f"http://127.0.0.1:{http_port}/", "extract": ["text"]}),
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compose_stack_runs_one_action_per_primitive(
    docker_client: Any,
    tmp_path: Path,
    http_peer: int,
    smtp_peer: tuple[int, list[Any]],
) -> None:
    from workers.executors import EXECUTOR_FACTORIES

    images = build_images()
    # browse needs the Chromium image (build-images.sh --browse): run it when it was built.
    has_browse = images.get("ACTIONFLEET_BROWSE_IMAGE") not in (None, images["ACTIONFLEET_IMAGE"])
    primitives = [
        p for p in PRIMITIVES if p in EXECUTOR_FACTORIES and (p != "browse" or has_browse)
    ]
    assert "code" in primitives

    smtp_port, received = smtp_peer
    workspaces = tmp_path / "workspaces"  # host dir shared by worker-files and worker-code
    workspaces.mkdir(mode=0o750)
    os.chown(workspaces, 10001, 10002)
    ports = {"AF_REDIS_PORT": free_port(), "AF_FLOWER_PORT": free_port()}
    ports["AF_METRICS_PORT"] = free_port()
    project = f"afsmoke{uuid.uuid4().hex[:8]}"
    test_override = tmp_path / "docker-compose.test.yml"
    worker_env = {
        "ACTIONFLEET_POLICY": "/etc/actionfleet/policy.yaml",
        "ACTIONFLEET_SMTP_HOST": "127.0.0.1",
        "ACTIONFLEET_SMTP_PORT": str(smtp_port),
        "ACTIONFLEET_SMTP_TLS": "none",
        "ACTIONFLEET_SMTP_ALLOW_CIDRS": "127.0.0.0/8",
    }
    test_override.write_text(
        yaml.safe_dump(
            {
                "version": "2.4",
                "services": {
                    f"worker-{p}": {
                        "environment": worker_env,
                        "volumes": [f"{TEST_POLICY}:/etc/actionfleet/policy.yaml:ro"],
                    }
                    for p in PRIMITIVES
                },
            }
        )
    )
    env = compose_env(**images, **{k: str(v) for k, v in ports.items()})
    env["ACTIONFLEET_WORKSPACE_DIR"] = str(workspaces)
    base = [compose_exe(), "-p", project, "-f", str(COMPOSE), "-f", str(LOCAL)]
    base += ["-f", str(test_override)]
    services = ["redis", "audit-ingester", "flower-local", "metrics-local"]
    services += [f"worker-{p}" for p in primitives]
    broker = f"redis://127.0.0.1:{ports['AF_REDIS_PORT']}/0"

    def dc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )

    try:
        up = dc("up", "-d", *services)
        assert up.returncode == 0, up.stderr[-3000:]
        _wait_healthy(dc, [f"worker-{p}" for p in primitives])

        # Workers require signed actions (the default): a producer key, made as an
        # operator would, inside the deployment.
        admin_url = f"redis://af-admin:{SECRETS['AF_REDIS_ADMIN_PASSWORD']}@127.0.0.1:"
        admin_url += f"{ports['AF_REDIS_PORT']}/0"
        made = dc(
            "exec",
            "-T",
            "-e",
            f"ACTIONFLEET_ADMIN_URL={admin_url}",
            "worker-files",
            "actionfleet",
            "keys",
            "create",
            "--tenant",
            "*",
            "--description",
            "compose smoke test",
            timeout=60,
        )
        assert made.returncode == 0, made.stderr[-2000:]
        key = json.loads(made.stdout)["secret"]

        client = ActionClient(
            broker,
            settings=Settings(broker_url=broker, broker_auth="key"),
            primitives=PRIMITIVES,
            key=key,
        )
        try:
            actions = _actions(http_peer)
            results = {p: client.run(actions[p], timeout=120) for p in primitives}
        finally:
            client.close()
        for p, r in results.items():
            assert r.status == "succeeded", (p, r.model_dump())
            assert r.worker == f"celery@af-worker-{p}", r.worker  # ran in the container
        assert results["code"].output is not None
        assert results["code"].output["stdout"] == "42\n"
        if "email" in results:
            assert len(received) == 1 and received[0].rcpt_tos == ["ops@example.com"]
        # A file written by the files container, read by a sandbox of the code container.
        if "files" in results:
            client = ActionClient(
                broker, settings=Settings(broker_url=broker, broker_auth="key"), key=key
            )
            try:
                src = "print(open('/workspace/smoke/hello.txt').read())"
                ws = client.run(
                    {
                        "primitive": "code",
                        "tenant_id": "apitest",
                        "agent_id": "sm",
                        "payload": {"language": "python", "source": src, "workspace": "ro"},
                    },
                    timeout=120,
                )
            finally:
                client.close()
            assert ws.status == "succeeded" and ws.output is not None, ws.model_dump()
            assert ws.output["stdout"] == "hi\n", ws.output
        if "api" in results:
            assert results["api"].output is not None
            assert results["api"].output["status"] == 200

        # Flower: behind basic auth. Metrics: the queues, served by the exporter container.
        flower = f"http://127.0.0.1:{ports['AF_FLOWER_PORT']}/"
        assert http_status(flower, wait_s=60) == 401
        assert (
            http_status(flower, ("admin", SECRETS["ACTIONFLEET_FLOWER_PASSWORD"]), wait_s=60) == 200
        )
        metrics = f"http://127.0.0.1:{ports['AF_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(metrics, timeout=10) as resp:
            text = resp.read().decode()
        assert "actionfleet_broker_up 1.0" in text
        for p in PRIMITIVES:
            assert f'actionfleet_queue_depth{{primitive="{p}",queue="{queue_for(p)}"}} 0.0' in text

        # The audit trail landed in the ingester's embedded store.
        ran = [*primitives, *(["code"] if "files" in primitives else [])]  # + the workspace one
        rows = _audit_rows(dc, len(ran))
        assert sorted(r["primitive"] for r in rows) == sorted(ran), rows
        assert {r["status"] for r in rows} == {"succeeded"}, rows
        # Redis persistence is on in the container (appendonly) and nothing was evicted.
        admin = redis.Redis.from_url(admin_url)
        info = admin.info()
        assert info["aof_enabled"] == 1 and info["evicted_keys"] == 0
        # The producer key's Redis user exists and was saved with the fleet's users.
        users = {u if isinstance(u, str) else u.decode() for u in admin.acl_users()}
        assert {"af-admin", "af-worker", f"p-{json.loads(made.stdout)['key_id']}"} <= users
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(broker).ping()  # the default user is off
    finally:
        logs = dc("logs", "--tail", "40", timeout=60).stdout
        down = dc("down", "-v", "--remove-orphans", "-t", "60", timeout=300)
        (tmp_path / "compose.log").write_text(logs)
    assert down.returncode == 0, down.stderr
    label = f"com.docker.compose.project={project}"
    assert not docker_client.containers.list(all=True, filters={"label": label})
    assert not docker_client.volumes.list(filters={"label": label})
    # No sandbox of this stack's code worker is left (others' tests may share the engine).
    sandboxes = docker_client.containers.list(all=True, filters={"label": "actionfleet.sandbox=1"})
    owners = [c.labels.get("actionfleet.owner", "") for c in sandboxes]
    assert not [o for o in owners if o.startswith("af-worker-code:")], owners


def _wait_healthy(dc: Any, services: list[str], timeout: float = 180) -> None:
    """Until every worker container reports healthy: its own Celery ping succeeded."""
    deadline = time.monotonic() + timeout
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        ids = dc("ps", "-q", *services, timeout=60).stdout.split()
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{.Name}} {{.State.Health.Status}}", *ids],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        status = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        if len(status) == len(services) and set(status.values()) == {"healthy"}:
            return
        time.sleep(2)
    logs = dc("logs", "--tail", "30", *services, timeout=60).stdout
    pytest.fail(f"workers not healthy after {timeout:.0f}s: {status}\n{logs[-4000:]}")


def _audit_rows(dc: Any, want: int, timeout: float = 60) -> list[dict[str, Any]]:
    sql = "SELECT primitive, status FROM actionfleet.action_results"
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        out = dc("exec", "-T", "audit-ingester", "actionfleet", "audit", "sql", sql, timeout=60)
        if out.returncode == 0:
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            if len(rows) >= want:
                return rows
        time.sleep(1)
    return rows
