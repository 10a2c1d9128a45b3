"""The files primitive end to end, and the code primitive's workspace mount: ActionClient ->
Redis -> real Celery worker subprocess (queues actions.files and actions.code) -> the tenant
workspace on the real filesystem and real Docker containers (runc) mounting it."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.client import ActionClient
from producer.models import ActionResult
from tests.conftest import RedisServer, Worker, code_action, start_worker
from workers.workspace.tenant import tenant_dirname

DB = 7  # this module's own Redis database
SECRET = "globex private data\n"


@pytest.fixture(scope="module")
def files_fleet(
    redis_server: RedisServer, sandbox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Worker, Path]]:
    home = tmp_path_factory.mktemp("files-fleet")
    root = home / "ws-root"
    url = redis_server.url(DB)
    worker = start_worker(
        url,
        home,
        queues="actions.files,actions.code",
        concurrency=2,
        sandbox_runtime="runc",
        workspace_root=str(root),
    )
    yield url, worker, root
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()


@pytest.fixture
def client(
    files_fleet: tuple[str, Worker, Path], make_client: Callable[[str], ActionClient]
) -> ActionClient:
    return make_client(files_fleet[0])


def files(tenant: str = "acme", **payload: Any) -> dict[str, Any]:
    return {"primitive": "files", "tenant_id": tenant, "agent_id": "tester", "payload": payload}


def code(source: str, workspace: str, tenant: str = "acme", **payload: Any) -> dict[str, Any]:
    return code_action(source, workspace=workspace, **payload) | {"tenant_id": tenant}


def run(client: ActionClient, action: dict[str, Any]) -> ActionResult:
    return client.run(action, timeout=120)


def ok(client: ActionClient, action: dict[str, Any]) -> dict[str, Any]:
    result = run(client, action)
    assert result.status == "succeeded", result
    assert result.output is not None
    return result.output


def refused(client: ActionClient, action: dict[str, Any], error_type: str) -> ActionResult:
    result = run(client, action)
    assert result.error is not None, result
    assert result.error.type == error_type, result
    assert result.output is None
    return result


def test_files_operations_through_a_worker(client: ActionClient) -> None:
    out = ok(client, files(op="write", path="notes/a.txt", content="héllo"))
    assert out["op"] == "write" and out["size"] == len("héllo".encode())
    assert out["sha256"] == hashlib.sha256("héllo".encode()).hexdigest()

    got = ok(client, files(op="read", path="notes/a.txt"))
    assert (got["content"], got["encoding"], got["sha256"]) == ("héllo", "utf-8", out["sha256"])

    blob = bytes(range(256))
    b64 = base64.b64encode(blob).decode()
    ok(client, files(op="write", path="bin/all.bytes", content=b64, encoding="base64"))
    back = ok(client, files(op="read", path="bin/all.bytes", encoding="base64"))
    assert base64.b64decode(back["content"]) == blob and back["size"] == 256
    bad = refused(client, files(op="read", path="bin/all.bytes"), "validation_error")
    assert bad.status == "invalid" and "base64" in bad.error.message  # type: ignore[union-attr]

    assert ok(client, files(op="stat", path="notes/a.txt"))["type"] == "file"
    ok(client, files(op="mkdir", path="empty/dir"))
    ok(client, files(op="move", path="notes/a.txt", dest="archive/a.txt"))
    names = [e["name"] for e in ok(client, files(op="list", path="."))["entries"]]
    assert names == ["archive", "bin", "empty", "notes"]
    gone = ok(client, files(op="delete", path="bin"))
    assert (gone["deleted_files"], gone["deleted_dirs"]) == (1, 1)
    refused(client, files(op="read", path="notes/a.txt"), "not_found")
    refused(client, files(op="mkdir", path="archive/a.txt"), "conflict")


def test_the_worker_log_names_the_action_not_its_output(
    client: ActionClient, files_fleet: tuple[str, Worker, Path]
) -> None:
    # Celery logs every result ("Task ... succeeded in ...: <result>"); for an action that
    # is its id, primitive and status, never what it read (workers.app.result_repr).
    marker = f"log-marker-{os.getpid()}-{time.monotonic_ns()}"
    ok(client, files(op="write", path="logged.txt", content=marker))
    result = run(client, files(op="read", path="logged.txt"))
    assert result.output is not None and result.output["content"] == marker
    worker = files_fleet[1]
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and not lines:
        text = worker.log.read_text()
        task = f"[acme+{result.action_id}] succeeded"  # the task id: tenant+action id
        lines = [ln for ln in text.splitlines() if task in ln]
        time.sleep(0.1)
    assert lines, worker.tail()
    assert f"'action_id': '{result.action_id}'" in lines[0], lines
    assert "'primitive': 'files', 'status': 'succeeded'" in lines[0], lines
    assert "'output'" not in lines[0] and marker not in worker.log.read_text()


@pytest.mark.parametrize(
    ("path", "field"),
    [("../other/x", "payload.path"), ("/etc/passwd", "payload.path"), ("a\x00b", "payload.path")],
)
def test_escaping_paths_are_invalid_with_field_reason_fix(
    client: ActionClient, path: str, field: str
) -> None:
    result = refused(client, files(op="read", path=path), "validation_error")
    assert result.status == "invalid"
    details = result.error.details  # type: ignore[union-attr]
    assert details["field"] == field and details["reason"] and details["fix"]


def test_quota_is_enforced_before_writing(
    client: ActionClient, files_fleet: tuple[str, Worker, Path]
) -> None:
    tdir = files_fleet[2] / "tinyfiles"
    big = refused(
        client, files("tinyfiles", op="write", path="big", content="x" * 101), "quota_exceeded"
    )
    assert big.status == "denied" and big.error.details["limit"] == 100  # type: ignore[union-attr]
    ok(client, files("tinyfiles", op="write", path="a", content="x" * 100))
    total = refused(
        client, files("tinyfiles", op="write", path="b", content="x" * 51), "quota_exceeded"
    )
    assert total.error.details["limit"] == 150  # type: ignore[union-attr]
    ok(client, files("tinyfiles", op="write", path="b", content="x" * 50))
    ok(client, files("tinyfiles", op="mkdir", path="c"))
    refused(client, files("tinyfiles", op="write", path="d", content=""), "quota_exceeded")
    assert sorted(p.name for p in tdir.iterdir()) == ["a", "b", "c"]


def test_files_write_then_code_ro_reads_it_and_cannot_write(client: ActionClient) -> None:
    ok(client, files(op="write", path="data/in.csv", content="x\n1\n2\n3\n"))
    src = (
        "import errno, os\n"
        "rows = open('/workspace/data/in.csv').read().split()[1:]\n"
        "print(sum(map(int, rows)))\n"
        "try:\n"
        "    open('/workspace/data/out.txt', 'w')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
        "print(os.getuid())\n"
    )
    out = ok(client, code(src, "ro"))
    assert out["stdout"].split() == ["6", "EROFS", "10001"], out
    refused(client, files(op="stat", path="data/out.txt"), "not_found")


def test_code_rw_writes_files_then_the_files_primitive_reads_them(client: ActionClient) -> None:
    src = (
        "import os\n"
        "os.makedirs('/workspace/results', exist_ok=True)\n"
        "open('/workspace/results/sum.txt', 'w').write('sum=6\\n')\n"
        "print(sorted(os.listdir('/workspace')))\n"
    )
    out = ok(client, code(src, "rw"))
    assert "'results'" in out["stdout"]
    got = ok(client, files(op="read", path="results/sum.txt"))
    assert got["content"] == "sum=6\n"
    assert got["sha256"] == hashlib.sha256(b"sum=6\n").hexdigest()
    # And code can change what the files primitive wrote (same owner, uid 10001).
    ok(client, files(op="write", path="results/by-files.txt", content="v1"))
    ok(client, code("open('/workspace/results/by-files.txt', 'a').write('+code')", "rw"))
    assert ok(client, files(op="read", path="results/by-files.txt"))["content"] == "v1+code"


def test_workspace_option_is_capped_by_policy(client: ActionClient) -> None:
    denied = refused(client, code("print(1)", "rw", tenant="rofiles"), "policy_denied")
    assert "'ro'" in denied.error.message  # type: ignore[union-attr]
    assert ok(client, code("print(1)", "ro", tenant="rofiles"))["stdout"] == "1\n"


def test_symlinks_and_hard_links_planted_by_code_do_not_escape(
    client: ActionClient, files_fleet: tuple[str, Worker, Path]
) -> None:
    root = files_fleet[2]
    ok(client, files("globex", op="write", path="secret.txt", content=SECRET))
    globex = root / tenant_dirname("globex")
    src = (
        "import os\n"
        "w = '/workspace/'\n"
        "os.symlink('/etc/passwd', w + 'passwd')\n"
        "os.symlink('../globex', w + 'other')\n"
        f"os.symlink({str(globex)!r}, w + 'other_abs')\n"
        f"os.symlink({str(globex / 'secret.txt')!r}, w + 'secret.txt')\n"
        "os.makedirs(w + 'd', exist_ok=True)\n"
        "os.symlink('/etc', w + 'd/etc')\n"
        "open(w + 'plain.txt', 'w').write('mine')\n"
        "os.link(w + 'plain.txt', w + 'linked.txt')\n"
        "print('planted')\n"
    )
    assert ok(client, code(src, "rw"))["stdout"] == "planted\n"

    for path in (
        "passwd",
        "secret.txt",
        "other/secret.txt",
        "other_abs/secret.txt",
        "d/etc/passwd",
    ):
        result = refused(client, files(op="read", path=path), "validation_error")
        assert "symbolic link" in result.error.message, result  # type: ignore[union-attr]
        refused(client, files(op="write", path=path, content="pwned"), "validation_error")
    for path in ("other", "other_abs", "d/etc"):
        refused(client, files(op="list", path=path), "validation_error")
        refused(client, files(op="move", path="plain.txt", dest=f"{path}/x"), "validation_error")
    hard = refused(client, files(op="read", path="linked.txt"), "validation_error")
    assert "hard links" in hard.error.message  # type: ignore[union-attr]
    assert ok(client, files(op="stat", path="passwd"))["type"] == "symlink"

    assert (globex / "secret.txt").read_text() == SECRET
    assert sorted(p.name for p in globex.iterdir()) == ["secret.txt"]
    # Deleting the planted links removes the links only.
    for path in ("passwd", "other", "other_abs", "secret.txt", "d"):
        ok(client, files(op="delete", path=path))
    assert (globex / "secret.txt").read_text() == SECRET
    assert Path("/etc/passwd").exists()


def test_one_tenant_cannot_see_another(client: ActionClient) -> None:
    ok(client, files("initech", op="write", path="only-initech.txt", content="i"))
    assert ok(client, files("umbrella", op="list", path="."))["entries"] == []
    refused(client, files("umbrella", op="read", path="only-initech.txt"), "not_found")
    src = "import os\nprint(sorted(os.listdir('/workspace')))\nprint(os.listdir('/'))"
    out = ok(client, code(src, "ro", tenant="umbrella"))
    first, rest = out["stdout"].split("\n", 1)
    assert first == "[]" and "initech" not in rest


@pytest.mark.parametrize(
    "runtime", [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.gvisor)]
)
def test_sandbox_workspace_mount_under_each_runtime(
    runtime: str, sandbox_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """RunSpec.workspace straight on the Docker backend: ro is EROFS, rw writes land on the
    host as the sandbox user; everything else about the container stays locked down."""
    from sandboxes.base import RunSpec
    from workers.workspace.tenant import Quota, Workspaces

    sandbox = sandbox_factory(runtime)
    workspaces = Workspaces(tmp_path / "root")
    ws = workspaces.tenant("acme")
    ws.write("in.txt", b"from host", Quota(1 << 20, 1 << 20, 100))
    tdir = workspaces.tenant_dir("acme")
    src = (
        "import errno, os\n"
        "print(open('/workspace/in.txt').read())\n"
        "try:\n"
        "    open('/workspace/out.txt', 'w').write('from ' + os.environ.get('X', 'code'))\n"
        "    print('wrote')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
        "try:\n"
        "    open('/etc/x', 'w')\n"
        "except OSError as e:\n"
        "    print('rootfs', errno.errorcode[e.errno])\n"
    )
    ro = sandbox.run(RunSpec(language="python", source=src, workspace=(tdir, "ro")))
    lines = ro.stdout.decode().split("\n")
    assert lines[:2] == ["from host", "EROFS"], ro
    # The root filesystem stays read-only too (gVisor checks permissions first: EACCES).
    assert lines[2] in {"rootfs EROFS", "rootfs EACCES"}, ro
    assert not (tdir / "out.txt").exists()
    rw = sandbox.run(RunSpec(language="python", source=src, workspace=(tdir, "rw")))
    assert rw.stdout.decode().split("\n")[:2] == ["from host", "wrote"], rw
    assert (tdir / "out.txt").read_bytes() == b"from code"
    assert ws.read("out.txt", 100).data == b"from code"
    if os.geteuid() == 0:
        assert (tdir / "out.txt").stat().st_uid == 10001


def test_code_rw_is_refused_once_the_workspace_is_over_quota(
    client: ActionClient, files_fleet: tuple[str, Worker, Path]
) -> None:
    """Code may write past the quota inside its container (nothing bounds a bind mount);
    the next rw mount is then refused, and so are files writes, until data is deleted."""
    tenant = "tinyfiles"
    src = "open('/workspace/dump.bin', 'wb').write(b'x' * 1000)"
    ok(client, code(src, "rw", tenant=tenant))
    over = refused(client, code("print(1)", "rw", tenant=tenant), "quota_exceeded")
    assert over.status == "denied" and "delete files" in over.error.message  # type: ignore[union-attr]
    refused(client, files(tenant, op="write", path="more", content="x"), "quota_exceeded")
    assert ok(client, code("print(1)", "ro", tenant=tenant))["stdout"] == "1\n"
    ok(client, files(tenant, op="delete", path="dump.bin"))
    assert ok(client, code("print(2)", "rw", tenant=tenant))["stdout"] == "2\n"
