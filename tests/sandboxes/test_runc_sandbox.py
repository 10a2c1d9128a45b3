"""The runc backend (sandboxes/runc.py) and the warm pool on it, with real runc containers.

The engine is needed once, to make the template from the sandbox image. Each test module
run gets its own backend directory (template, bundles, runc state), and ends with a check
that no container, bundle or cgroup of it is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from producer.client import ActionClient
from producer.errors import SandboxError
from sandboxes import open_backend
from sandboxes.base import Limits, RunOutcome, RunSpec
from sandboxes.pool import PooledSandbox
from sandboxes.reaper import run_labels
from sandboxes.runc import CGROUP_PARENT, RuncSandbox
from sandboxes.runc_bundle import template_dir
from sandboxes.seccomp_filter import read_filters
from tests.conftest import MARKER_PROGRAM, RedisServer, code_action, start_worker
from tests.services import require
from workers.config import Settings

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Limits(timeout_s=10, memory_mb=128, pids=64, output_bytes=65536)


@pytest.fixture(scope="module")
def runc_dir(tmp_path_factory: pytest.TempPathFactory, sandbox_image: str) -> Iterator[Path]:
    require(
        os.geteuid() == 0 and shutil.which("runc") is not None,
        "root and runc on PATH (the runc sandbox backend)",
    )
    directory = tmp_path_factory.mktemp("runc")
    cgroups_before = container_cgroups()
    yield directory
    # Nothing of any test may be left: containers (runc state), bundles, cgroups.
    backend = RuncSandbox(image=sandbox_image, directory=directory)
    left = backend.containers()
    bundles = list((directory / "bundles").glob("*"))
    cgroups = sorted(container_cgroups() - cgroups_before)
    backend.reap_all()
    assert (left, bundles, cgroups) == ([], [], [])


def container_cgroups() -> set[str]:
    """The backend's container cgroups on this host (memory controller of v1, or v2)."""
    found: set[str] = set()
    for parent in (f"/sys/fs/cgroup/memory/{CGROUP_PARENT}", f"/sys/fs/cgroup/{CGROUP_PARENT}"):
        found |= {p.name for p in Path(parent).glob("*") if p.is_dir()}
    return found


@pytest.fixture(scope="module")
def runc(runc_dir: Path, sandbox_image: str) -> RuncSandbox:
    return RuncSandbox(image=sandbox_image, directory=runc_dir)


@pytest.fixture
def make_pool(runc: RuncSandbox) -> Iterator[Callable[..., PooledSandbox]]:
    made: list[PooledSandbox] = []

    def make(**kwargs: object) -> PooledSandbox:
        # A pool closes its backend; a fresh one shares the module's directory.
        backend = RuncSandbox(image=runc.image, directory=runc.directory)
        pool = PooledSandbox(backend, **kwargs)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def run(sandbox: RuncSandbox | PooledSandbox, source: str, **limits: object) -> RunOutcome:
    spec_limits = dataclasses.replace(LIMITS, **limits)  # type: ignore[arg-type]
    return sandbox.run(RunSpec(language="python", source=source, limits=spec_limits))


def grow(pool: PooledSandbox, n: int) -> None:
    """Demand of ``n`` concurrent runs, so that the pool grows to ``n`` warm containers."""
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda _: run(pool, "pass"), range(n)))
    wait_warm(pool, n)


def wait_warm(pool: PooledSandbox, n: int = 1) -> None:
    """Until ``n`` containers are warm (a bound, not a timing assertion)."""
    end = time.monotonic() + 60
    while pool.warm_count(LIMITS) < n:
        assert time.monotonic() < end, f"pool never reached {n} warm: {pool.stats}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- one run


def test_runs_a_program_and_reports_its_output(runc: RuncSandbox) -> None:
    outcome = runc.run(
        RunSpec(
            language="python",
            source="import sys; print(sys.stdin.read().upper()); sys.exit(3)",
            stdin=b"hello",
            limits=LIMITS,
        )
    )
    assert (outcome.exit_code, outcome.stdout, outcome.runtime) == (3, b"HELLO\n", "runc")
    assert not outcome.timed_out and not outcome.oom_killed
    assert outcome.sandbox_id not in runc.containers()  # deleted after the run
    bash = runc.run(RunSpec(language="bash", source="echo $((6*7)) >&2", limits=LIMITS))
    assert (bash.exit_code, bash.stderr) == (0, b"42\n")


def test_every_run_gets_a_fresh_container(runc: RuncSandbox) -> None:
    outcomes = [run(runc, MARKER_PROGRAM) for _ in range(3)]
    assert [json.loads(o.stdout)["seen"] for o in outcomes] == [[], [], []]
    assert len({o.sandbox_id for o in outcomes}) == 3


HARDENING_PROGRAM = r"""
import json, os
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines())
def writable(path):
    try:
        open(path, "w").close()
        return True
    except OSError:
        return False
def cg(name):
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        try:
            return open(f"{root}/{name}").read().strip()
        except OSError:
            pass
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "root_writable": writable("/etc/x"), "tmp_writable": writable("/tmp/x"),
    "memory_limit": cg("memory.limit_in_bytes") or cg("memory.max"),
}))
"""


def test_container_is_locked_down_like_the_docker_backend(runc: RuncSandbox) -> None:
    outcome = run(runc, HARDENING_PROGRAM, memory_mb=96)
    assert outcome.exit_code == 0, outcome.stderr
    got = json.loads(outcome.stdout)
    assert (got["uid"], got["gid"]) == (10001, 10001)
    assert got["cap_eff"] == got["cap_bnd"] == "0000000000000000"
    assert (got["no_new_privs"], got["seccomp"]) == ("1", "2")
    assert got["interfaces"] == ["lo"]  # no network: a namespace with loopback only
    assert (got["root_writable"], got["tmp_writable"]) == (False, True)
    assert got["memory_limit"] == str(96 * 1024 * 1024)


SYSCALL_PROBE = r"""
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(number, *args):
    ctypes.set_errno(0)
    return 0 if libc.syscall(number, *args) == 0 else ctypes.get_errno()
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({
    "seccomp": status["Seccomp"].strip(), "filters": status["Seccomp_filters"].strip(),
    "keyctl": errno_of(250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID: not in the profile
    "unshare_user": errno_of(272, 0x10000000),  # CLONE_NEWUSER: needs CAP_SYS_ADMIN there
    "clone3": errno_of(435, 0, 0),  # ENOSYS in the profile, so libc falls back to clone
    "getpid": errno_of(39),
}))
"""


def test_programs_run_under_the_docker_backends_own_seccomp_program(
    runc: RuncSandbox, sandbox_factory: Callable[..., Any], docker_client: docker.DockerClient
) -> None:
    engine = sandbox_factory("runc")
    on_engine = engine.run(RunSpec(language="python", source=SYSCALL_PROBE, limits=LIMITS))
    on_runc = run(runc, SYSCALL_PROBE)
    assert on_runc.stdout == on_engine.stdout, (on_runc.stderr, on_engine.stderr)
    assert json.loads(on_runc.stdout) == {
        "seccomp": "2", "filters": "1", "keyctl": errno.EPERM,
        "unshare_user": errno.EPERM, "clone3": errno.ENOSYS, "getpid": 0,
    }  # fmt: skip
    # The runner is under exactly the template's program, which is the engine's runc's
    # compilation of the profile (runc orders the rules differently from one compilation to
    # the next, so two engine containers' programs differ in bytes, not in decisions).
    labels = run_labels(RunSpec(language="python", source="", limits=LIMITS), "runc", 2.0)
    warm = runc.start_warm(LIMITS, labels)
    try:
        end = time.monotonic() + 30
        while "Seccomp:\t2\n" not in Path(f"/proc/{warm.handle.pid}/status").read_text():
            assert time.monotonic() < end, "the runner never installed its filter"
            time.sleep(0.01)
        home = template_dir(runc.directory, docker_client.images.get(runc.image).id)
        program = home / "rootfs/opt/actionfleet/seccomp.bpf"
        assert read_filters(warm.handle.pid) == [program.read_bytes()]
    finally:
        runc.retire(warm)


def test_a_runner_without_its_seccomp_program_runs_nothing(
    runc: RuncSandbox, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    runc.template()
    image_id = docker_client.images.get(runc.image).id
    config = json.loads((template_dir(runc.directory, image_id) / "config.json").read_text())
    args = config["process"]["args"]
    assert args[-2:] == ["--seccomp-filter", "/opt/actionfleet/seccomp.bpf"]
    assert "seccomp" not in config["linux"]  # runc compiles nothing per container
    workspace = tmp_path / "workspace"
    workspace.mkdir(mode=0o777)
    os.chmod(workspace, 0o777)
    source = "open('/workspace/ran', 'w').close()"
    for bad in ("/opt/actionfleet/missing.bpf", "/dev/null"):
        # A template whose runner is pointed at no program (the root is the real one's).
        broken_dir = tmp_path / secrets.token_hex(4)
        template_dir(broken_dir, image_id).mkdir(parents=True)
        config["process"]["args"] = [*args[:-1], bad]
        (template_dir(broken_dir, image_id) / "config.json").write_text(json.dumps(config))
        broken = RuncSandbox(image=runc.image, directory=broken_dir)
        spec = RunSpec(language="python", source=source, limits=LIMITS, workspace=(workspace, "rw"))
        with pytest.raises(SandboxError, match="no seccomp filter, so nothing runs"):
            broken.run(spec)
        broken.close()
        assert broken.containers() == [] and not (workspace / "ran").exists()
    # The same program with the real template runs (so the check above could fail).
    assert runc.run(spec).exit_code == 0 and (workspace / "ran").exists()


def test_program_cannot_reach_the_host_network(runc: RuncSandbox) -> None:
    source = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 22), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    # The container's loopback is its own: the host's 127.0.0.1 is not there.
    assert run(runc, source).stdout == b"ConnectionRefusedError\n"


def test_timeout_kills_the_program_and_removes_the_container(runc: RuncSandbox) -> None:
    outcome = run(runc, "import time; time.sleep(30)", timeout_s=1)
    assert outcome.timed_out and outcome.exit_code is None
    assert outcome.sandbox_id not in runc.containers()


def test_memory_bomb_is_reported_as_oom(runc: RuncSandbox) -> None:
    outcome = run(runc, "b = []\nwhile True: b.append(bytearray(8 << 20))", memory_mb=64)
    assert outcome.oom_killed and not outcome.timed_out
    assert outcome.sandbox_id not in runc.containers()


def test_process_count_is_bounded_by_the_pids_limit(runc: RuncSandbox) -> None:
    source = (
        "import subprocess\n"
        "procs = []\n"
        "try:\n"
        "    for _ in range(100):\n"
        "        procs.append(subprocess.Popen(['sleep', '5']))\n"
        "except OSError as e:\n"
        "    print(len(procs), e.errno)\n"
    )
    outcome = run(runc, source, pids=16)
    started, errno = map(int, outcome.stdout.split())
    assert started < 16 and errno == 11  # EAGAIN: the pids cgroup refused the fork


def test_workspace_is_mounted_read_only_or_read_write(runc: RuncSandbox, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host")
    os.chmod(tmp_path, 0o777)
    source = (
        "print(open('/workspace/in.txt').read())\n"
        "try:\n"
        "    open('/workspace/out.txt', 'w').write('from the sandbox')\n"
        "    print('wrote')\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
    )
    for mode, last in (("ro", b"30"), ("rw", b"wrote")):
        spec = RunSpec(language="python", source=source, limits=LIMITS, workspace=(tmp_path, mode))
        outcome = runc.run(spec)
        assert outcome.stdout.splitlines() == [b"from the host", last]
    assert (tmp_path / "out.txt").read_text() == "from the sandbox"


def test_missing_workspace_is_a_sandbox_error(runc: RuncSandbox, tmp_path: Path) -> None:
    spec = RunSpec(language="python", source="", workspace=(tmp_path / "missing", "ro"))
    with pytest.raises(SandboxError, match="not an existing absolute directory"):
        runc.run(spec)


# --------------------------------------------------------------------------- the pool


def test_pool_never_hands_a_container_to_two_runs(
    make_pool: Callable[..., PooledSandbox],
) -> None:
    pool = make_pool(max_per_profile=3, prewarm=(LIMITS,))
    grow(pool, 3)
    with ThreadPoolExecutor(4) as ex:
        outcomes = list(ex.map(lambda _: run(pool, MARKER_PROGRAM), range(16)))
    assert all(json.loads(o.stdout)["seen"] == [] for o in outcomes)
    assert len({o.sandbox_id for o in outcomes}) == 16
    assert pool.stats["warm_runs"] >= 1
    assert pool.settle()
    assert not {o.sandbox_id for o in outcomes} & set(pool.cold.containers())


def test_pool_destroys_containers_whose_run_timed_out_or_was_oom_killed(
    make_pool: Callable[..., PooledSandbox],
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    wait_warm(pool)
    timed_out = run(pool, "import time; time.sleep(30)", timeout_s=1)
    wait_warm(pool)
    oom = run(pool, "b = []\nwhile True: b.append(bytearray(8 << 20))")
    assert timed_out.timed_out and oom.oom_killed
    assert pool.stats["warm_runs"] == 2
    assert pool.settle()
    left = set(pool.cold.containers())
    assert timed_out.sandbox_id not in left and oom.sandbox_id not in left
    assert run(pool, "print('next')").stdout == b"next\n"


def test_burst_larger_than_the_pool_is_served_on_the_cold_path(
    make_pool: Callable[..., PooledSandbox],
) -> None:
    pool = make_pool(max_per_profile=2, prewarm=(LIMITS,))
    wait_warm(pool, 1)
    with ThreadPoolExecutor(6) as ex:
        outcomes = list(ex.map(lambda i: run(pool, f"print({i})"), range(6)))
    assert [o.stdout for o in outcomes] == [f"{i}\n".encode() for i in range(6)]
    assert pool.stats["cold_runs"] >= 1 and pool.stats["warm_runs"] >= 1


def test_closing_the_pool_leaves_no_container(
    make_pool: Callable[..., PooledSandbox], runc: RuncSandbox
) -> None:
    pool = make_pool(max_per_profile=3, prewarm=(LIMITS,))
    grow(pool, 3)
    warm = set(pool.warm_ids())
    assert warm <= set(runc.containers())
    pool.close()
    assert not warm & set(runc.containers())
    assert not any((runc.directory / "bundles" / cid).exists() for cid in warm)


def test_container_that_died_while_warm_is_skipped(
    make_pool: Callable[..., PooledSandbox], runc: RuncSandbox
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    wait_warm(pool)
    (dead,) = pool.warm_ids()
    state = ["runc", "--root", str(runc.directory / "state"), "state", dead]
    subprocess.run(["runc", "--root", str(runc.directory / "state"), "kill", dead, "KILL"])
    end = time.monotonic() + 30
    while json.loads(subprocess.run(state, capture_output=True).stdout)["status"] != "stopped":
        assert time.monotonic() < end
        time.sleep(0.05)
    outcome = run(pool, "print(7)")
    assert outcome.stdout == b"7\n" and outcome.sandbox_id != dead


# --------------------------------------------------------------------------- leftovers

CHILD_POOL = """
import sys, time
from pathlib import Path
from sandboxes.base import Limits
from sandboxes.pool import PooledSandbox
from sandboxes.runc import RuncSandbox
pool = PooledSandbox(RuncSandbox(image=sys.argv[1], directory=Path(sys.argv[2])),
                     max_per_profile=2, prewarm=(Limits(timeout_s=10, memory_mb=128, pids=64),))
while pool.warm_count() < 1:
    time.sleep(0.05)
print(" ".join(pool.warm_ids()), flush=True)
time.sleep(600)
"""


def test_containers_of_a_killed_worker_are_reaped(
    make_pool: Callable[..., PooledSandbox], runc: RuncSandbox
) -> None:
    live = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    wait_warm(live)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_POOL, runc.image, str(runc.directory)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert proc.stdout is not None
    orphans = proc.stdout.readline().split()
    proc.send_signal(signal.SIGKILL)  # no close(): its containers stay, owner gone
    proc.wait()
    assert len(orphans) == 1 and set(orphans) <= set(runc.containers())
    assert runc.reap() == 1
    left = set(runc.containers())
    assert not set(orphans) & left
    assert set(live.warm_ids()) <= left  # a live owner's containers are not touched
    assert run(live, "print(3)").stdout == b"3\n"


def test_reap_prunes_templates_of_images_the_engine_no_longer_has(
    runc: RuncSandbox, docker_client: docker.DockerClient
) -> None:
    runc.template()
    images = runc.directory / "images"
    (current,) = [p.name for p in images.iterdir() if not p.name.startswith(".")]
    # An earlier recipe's image, still run by an old worker during a rolling upgrade.
    tag = f"actionfleet-test-earlier:{secrets.token_hex(4)}"
    recipe = f"FROM {runc.image}\nLABEL actionfleet.test={tag}\n".encode()
    earlier, _ = docker_client.images.build(fileobj=io.BytesIO(recipe), tag=tag, rm=True)
    earlier_id = template_dir(runc.directory, earlier.id).name
    old_worker = RuncSandbox(image=tag, directory=runc.directory)
    died_building, building = images / ".tmp-000000000000", images / ".tmp-111111111111"
    try:
        assert run(old_worker, "print(1)").stdout == b"1\n"
        docker_client.images.remove(tag)
        died_building.mkdir()
        os.utime(died_building, (0, 0))
        building.mkdir()
        runc.reap()
        # Held by the old worker: kept; a build in progress: kept; a dead build: gone.
        assert {p.name for p in images.iterdir()} == {current, earlier_id, building.name}
        assert run(old_worker, "print(2)").stdout == b"2\n"
    finally:
        old_worker.close()
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag)
    runc.reap()
    assert {p.name for p in images.iterdir()} == {current, building.name}
    assert run(runc, "print(3)").stdout == b"3\n"  # the current image's template still works
    building.rmdir()


def test_code_actions_through_a_worker_on_the_runc_backend(
    runc: RuncSandbox,
    redis_server: RedisServer,
    tmp_path: Path,
    make_client: Callable[[str], ActionClient],
) -> None:
    url = redis_server.url(11)
    worker = start_worker(
        url, tmp_path, sandbox_backend="runc", sandbox_runc_dir=str(runc.directory)
    )
    try:
        client = make_client(url)
        results = [
            client.run(code_action(source, timeout_s=2), timeout=60)
            for source in (
                "import socket; print(socket.gethostname(), 6 * 7)",
                "import time; time.sleep(30)",
                "b = []\nwhile True: b.append(bytearray(8 << 20))",
            )
        ]
        ok, slow, hungry = results
        assert (ok.status, ok.output and ok.output["stdout"]) == ("succeeded", "sandbox 42\n")
        assert slow.status == "timed_out", slow
        assert hungry.status == "failed" and hungry.error is not None, hungry
        assert hungry.error.type == "resource_exhausted", hungry
        assert any(runc.containers())  # the pool processes keep warm containers
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.tail()
    assert runc.containers() == []  # the worker's shutdown removed its warm containers


def test_settings_choose_the_backend(runc_dir: Path, sandbox_image: str) -> None:
    backend = open_backend(Settings(sandbox_backend="runc", sandbox_runc_dir=runc_dir))
    assert isinstance(backend, RuncSandbox) and backend.directory == runc_dir.resolve()
    with pytest.raises(ValueError, match="runs runc only"):
        Settings(sandbox_backend="runc", sandbox_runtime="runsc")
