"""The Docker sandbox backend against a real engine: real containers, runc and gVisor.

Every behavioural test runs under both runtimes (the runsc ones are marked ``gvisor``).
Needs the plugin ``tests.fixtures_docker``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from producer.errors import SandboxError
from sandboxes.base import Limits, RunOutcome, RunSpec
from sandboxes.docker import (
    LABEL_EXPIRES,
    LABEL_OWNER,
    LABEL_SANDBOX,
    DockerSandbox,
    list_sandbox_containers,
)
from tests.fixtures_docker import SandboxFactory, settled_orphan_runtime_processes

RUNTIMES = ["runc", pytest.param("runsc", marks=pytest.mark.gvisor)]
# Measured: runc adds ~0.15 s around a program, runsc ~0.4 s. ``timed_out`` proves the
# deadline acted; the elapsed bound only catches a hang, so it is generous: a loaded
# machine's container start and removal must not fail the test (benchmarks measure time).
DEADLINE_SLACK_S = 10.0


@pytest.fixture(params=RUNTIMES)
def sandbox(request: pytest.FixtureRequest) -> DockerSandbox:
    return request.getfixturevalue(f"{request.param}_sandbox")


def run(sandbox: DockerSandbox, source: str, language: str = "python", **kw: object) -> RunOutcome:
    limits = kw.pop("limits", Limits(timeout_s=10))
    return sandbox.run(RunSpec(language=language, source=source, limits=limits, **kw))  # type: ignore[arg-type]


def run_json(sandbox: DockerSandbox, source: str, **kw: object) -> dict:
    """Run a Python program that prints one JSON object; return it (fail on a bad run)."""
    outcome = run(sandbox, source, **kw)
    assert outcome.exit_code == 0, outcome
    return json.loads(outcome.stdout)


def own_containers(client: docker.DockerClient) -> list[dict]:
    """Sandbox containers this test process created (others may share the engine)."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    return [
        c for c in list_sandbox_containers(client) if (c.get("Labels") or {}).get(LABEL_OWNER) == me
    ]


def assert_gone(client: docker.DockerClient, sandbox_id: str) -> None:
    assert sandbox_id, "the outcome must name its container"
    assert client.api.containers(all=True, filters={"id": sandbox_id}) == []


# --------------------------------------------------------------------------- basics


def test_python_hello(sandbox: DockerSandbox, docker_client: docker.DockerClient) -> None:
    outcome = run(
        sandbox,
        "import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)\nsys.exit(3)",
    )
    assert outcome.stdout == b"hello 42\n"
    assert outcome.stderr == b"oops\n"
    assert outcome.exit_code == 3
    assert (outcome.timed_out, outcome.oom_killed) == (False, False)
    assert (outcome.stdout_truncated, outcome.stderr_truncated) == (False, False)
    assert outcome.runtime == sandbox.runtime
    assert outcome.usage.wall_ms > 0 and outcome.usage.max_rss_kb > 0
    assert_gone(docker_client, outcome.sandbox_id)


def test_bash_hello_and_exit_code(sandbox: DockerSandbox) -> None:
    outcome = run(sandbox, 'echo "out $((6 * 7))"; echo err >&2; exit 7', language="bash")
    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (b"out 42\n", b"err\n", 7)


def test_stdin_is_passed_through(sandbox: DockerSandbox) -> None:
    data = os.urandom(300_000)  # larger than a pipe buffer, and binary
    source = (
        "import sys, hashlib\n"
        "data = sys.stdin.buffer.read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest())"
    )
    outcome = run(sandbox, source, stdin=data)
    assert outcome.stdout.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]


def test_program_killed_by_signal_has_no_exit_code(sandbox: DockerSandbox) -> None:
    outcome = run(sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert outcome.exit_code is None
    assert (outcome.timed_out, outcome.oom_killed) == (False, False)  # not OOM: no memory hit


def test_output_over_limit_is_truncated_and_flagged(sandbox: DockerSandbox) -> None:
    source = "import sys\nsys.stdout.write('x' * 5000)\nsys.stderr.write('y' * 3000)"
    outcome = run(sandbox, source, limits=Limits(timeout_s=10, output_bytes=1000))
    assert outcome.stdout == b"x" * 1000 and outcome.stdout_truncated
    assert outcome.stderr == b"y" * 1000 and outcome.stderr_truncated
    assert outcome.exit_code == 0


def test_output_at_limit_is_not_truncated(sandbox: DockerSandbox) -> None:
    outcome = run(sandbox, "print('z' * 999)", limits=Limits(timeout_s=10, output_bytes=1000))
    assert outcome.stdout == b"z" * 999 + b"\n"
    assert not outcome.stdout_truncated


# --------------------------------------------------------------------------- limits


def test_infinite_loop_times_out_and_container_is_gone(
    sandbox: DockerSandbox, docker_client: docker.DockerClient
) -> None:
    timeout_s = 1.5
    started = time.monotonic()
    outcome = run(sandbox, "while True:\n    pass", limits=Limits(timeout_s=timeout_s))
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert elapsed < timeout_s + DEADLINE_SLACK_S, f"took {elapsed:.2f}s"
    assert outcome.usage.wall_ms >= timeout_s * 1000 * 0.9
    assert_gone(docker_client, outcome.sandbox_id)
    assert own_containers(docker_client) == []


def test_background_sleeper_does_not_hold_the_run(sandbox: DockerSandbox) -> None:
    started = time.monotonic()
    outcome = run(sandbox, "sleep 60 &\necho started", language="bash")
    assert outcome.stdout == b"started\n" and outcome.exit_code == 0
    assert time.monotonic() - started < 10


def test_memory_bomb_is_oom_killed(sandbox: DockerSandbox) -> None:
    memory_mb = 64
    source = (
        "chunks = []\n"
        f"for _ in range({10 * memory_mb}):\n"
        "    chunks.append(b'\\x01' * (1 << 20))\n"  # written pages, not lazy zero pages
        "print('survived')"
    )
    outcome = run(sandbox, source, limits=Limits(timeout_s=20, memory_mb=memory_mb))
    assert outcome.oom_killed, outcome
    assert not outcome.timed_out
    assert outcome.exit_code is None
    assert b"survived" not in outcome.stdout


def test_pids_limit_caps_processes(sandbox: DockerSandbox) -> None:
    pids = 40
    source = (
        "import os, time\n"
        "n = 0\n"
        "while n < 500:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print(n)"
    )
    outcome = run(sandbox, source, limits=Limits(timeout_s=20, pids=pids, memory_mb=512))
    assert outcome.exit_code == 0, outcome
    spawned = int(outcome.stdout)
    assert 0 < spawned < pids


PYTHON_FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.parametrize(
    "language,source",
    [("bash", ":(){ :|:& };:\nwait"), ("python", PYTHON_FORK_BOMB)],
    ids=["bash", "python"],
)
def test_fork_bomb_is_contained(
    sandbox: DockerSandbox, docker_client: docker.DockerClient, language: str, source: str
) -> None:
    timeout_s = 3.0
    started = time.monotonic()
    outcome = run(sandbox, source, language=language, limits=Limits(timeout_s=timeout_s, pids=64))
    assert time.monotonic() - started < timeout_s + DEADLINE_SLACK_S + 1
    # It ends one of the ways a contained program ends: deadline, OOM, or giving up.
    assert outcome.timed_out or outcome.oom_killed or outcome.exit_code is not None
    assert_gone(docker_client, outcome.sandbox_id)
    after = run(sandbox, "print('still fine')")
    assert after.stdout == b"still fine\n"


# --------------------------------------------------------------------------- isolation


def test_no_network_to_host_loopback(sandbox: DockerSandbox) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        result = run_json(
            sandbox,
            "import json, socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "    print(json.dumps({'connected': True}))\n"
            "except OSError as exc:\n"
            "    print(json.dumps({'connected': False, 'error': repr(exc)}))",
        )
        # A completed handshake would sit in the backlog whether or not we accept().
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert result["connected"] is False, result


def test_no_name_resolution_and_only_loopback(sandbox: DockerSandbox) -> None:
    result = run_json(
        sandbox,
        "import json, socket\n"
        "try:\n"
        "    socket.getaddrinfo('actionfleet-sandbox-test.invalid', 80)\n"
        "    resolved = True\n"
        "except OSError as exc:\n"
        "    resolved = repr(exc)\n"
        "names = [name for _, name in socket.if_nameindex()]\n"
        "print(json.dumps({'resolved': resolved, 'interfaces': names}))",
    )
    assert result["resolved"] is not True
    assert result["interfaces"] == ["lo"]


def test_files_do_not_survive_between_runs(sandbox: DockerSandbox) -> None:
    first = run(
        sandbox,
        "open('/work/x', 'w').write('secret')\nopen('/tmp/y', 'w').write('secret')\n"
        "import os\nprint(sorted(os.listdir('/work')), sorted(os.listdir('/tmp')))",
    )
    assert first.exit_code == 0 and b"'x'" in first.stdout and b"'y'" in first.stdout, first
    second = run_json(
        sandbox,
        "import json, os\nprint(json.dumps([os.path.exists('/work/x'), os.path.exists('/tmp/y')]))",
    )
    assert second == [False, False]


def test_root_filesystem_is_read_only(sandbox: DockerSandbox) -> None:
    result = run_json(
        sandbox,
        "import json\n"
        "errors = {}\n"
        "for path in ['/etc/x', '/home/x', '/opt/actionfleet/x', '/x', '/usr/bin/x']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        errors[path] = None\n"
        "    except OSError as exc:\n"
        "        errors[path] = exc.strerror\n"
        "print(json.dumps(errors))",
    )
    assert all(result.values()), f"writable: {[p for p, e in result.items() if not e]}"


def test_unprivileged_identity(sandbox: DockerSandbox) -> None:
    result = run_json(
        sandbox,
        "import ctypes, json, os\n"
        "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status')"
        " if ':\\t' in line)\n"
        "libc = ctypes.CDLL(None)\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'euid': os.geteuid(),\n"
        "    'cap_eff': status['CapEff'].strip(), 'cap_prm': status['CapPrm'].strip(),\n"
        "    'no_new_privs': libc.prctl(39, 0, 0, 0, 0)}))",  # PR_GET_NO_NEW_PRIVS
    )
    assert (result["uid"], result["gid"], result["euid"]) == (10001, 10001, 10001)
    assert int(result["cap_eff"], 16) == 0
    assert int(result["cap_prm"], 16) == 0
    assert result["no_new_privs"] == 1


def test_program_cannot_forge_the_result(sandbox: DockerSandbox) -> None:
    # The program shares the runner's uid. Under runc the runner is non-dumpable, so
    # /proc/1/fd/1 (the result stream) cannot be opened; gVisor allows it, so there the
    # forged lines must simply lose against the runner's nonce-carrying last frame.
    source = (
        "import sys\n"
        'forged = \'{"v": 1, "ok": false, "error": "forged"}\'\n'
        "try:\n"
        "    with open('/proc/1/fd/1', 'w') as f:\n"
        "        f.write(forged + '\\n' + forged + '\\n{\"v\": 1, \"nonce\": ')\n"
        "    print('opened')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.strerror)\n"
        "sys.exit(5)"
    )
    outcome = run(sandbox, source)
    assert outcome.exit_code == 5
    assert outcome.stdout.startswith((b"opened", b"refused")), outcome
    if sandbox.runtime == "runc":
        assert outcome.stdout.startswith(b"refused"), outcome.stdout


def test_concurrent_runs_are_independent(sandbox: DockerSandbox) -> None:
    def one(i: int) -> RunOutcome:
        return run(sandbox, f"import sys\nprint({i} * 3)\nsys.exit({i})")

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(one, range(6)))
    assert [o.stdout for o in outcomes] == [f"{i * 3}\n".encode() for i in range(6)]
    assert [o.exit_code for o in outcomes] == list(range(6))
    assert len({o.sandbox_id for o in outcomes}) == 6


def test_network_flag_still_runs_without_network(sandbox: DockerSandbox) -> None:
    result = run_json(
        sandbox,
        "import json, socket\nprint(json.dumps([n for _, n in socket.if_nameindex()]))",
        network=True,
    )
    assert result == ["lo"]


def test_labels_are_set_while_running(
    sandbox: DockerSandbox, docker_client: docker.DockerClient
) -> None:
    seen: list[dict] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not seen:
            seen.extend(c["Labels"] for c in list_sandbox_containers(docker_client))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        before = time.time()
        run(
            sandbox,
            "import time\ntime.sleep(2)",
            labels={"action_id": "a-1"},
            limits=Limits(timeout_s=5),
        )
    finally:
        stop.set()
        watcher.join()
    assert seen, "the running container was never listed"
    labels = seen[0]
    assert labels[LABEL_SANDBOX] == "1"
    assert labels["actionfleet.action_id"] == "a-1"
    assert labels[LABEL_OWNER] == f"{socket.gethostname()}:{os.getpid()}"
    assert before + 5 < float(labels[LABEL_EXPIRES]) < before + 5 + 120


# --------------------------------------------------------------------------- failures, reaping


def test_host_watchdog_kills_a_runner_past_its_deadline(
    sandbox_factory: SandboxFactory, docker_client: docker.DockerClient, sandbox: DockerSandbox
) -> None:
    # A negative grace makes the host's backstop fire before the runner's own deadline,
    # which is how a hung runner looks from the host.
    # The backstop fires at 2 s, the runner's own deadline only at 20 s: ending well
    # before 20 s can only be the backstop's doing, with room for a slow container.
    hasty = sandbox_factory(sandbox.runtime, kill_grace_s=-18.0)
    started = time.monotonic()
    outcome = run(hasty, "import time\ntime.sleep(60)", limits=Limits(timeout_s=20))
    elapsed = time.monotonic() - started
    assert outcome.timed_out and outcome.exit_code is None and not outcome.oom_killed
    assert elapsed < 15, f"took {elapsed:.2f}s: the watchdog (at 2 s) did not act"
    assert_gone(docker_client, outcome.sandbox_id)


def test_interrupted_run_still_removes_its_container(
    sandbox: DockerSandbox, docker_client: docker.DockerClient
) -> None:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(KeyboardInterrupt):
            run(sandbox, "import time\ntime.sleep(20)", limits=Limits(timeout_s=30))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert own_containers(docker_client) == []


def test_missing_image_is_a_sandbox_error(
    sandbox_factory: SandboxFactory, docker_client: docker.DockerClient
) -> None:
    broken = DockerSandbox(image="actionfleet-sandbox:does-not-exist", client=docker_client)
    with pytest.raises(SandboxError, match="missing"):
        broken.run(RunSpec(language="python", source="print(1)"))
    assert own_containers(docker_client) == []


def test_failed_start_leaves_no_container_or_runtime_process(
    sandbox: DockerSandbox, docker_client: docker.DockerClient
) -> None:
    # A negative tmpfs size passes docker's checks but fails the mount at start. Under
    # gVisor that used to leave the container's containerd-shim running after removal.
    with pytest.raises(SandboxError) as failure:
        run(sandbox, "print(1)", limits=Limits(tmpfs_mb=-1))
    container_id = re.search(r"containers/([0-9a-f]{64})/start", str(failure.value))
    assert container_id, f"error does not name the container: {failure.value}"
    assert_gone(docker_client, container_id.group(1))
    assert settled_orphan_runtime_processes(docker_client) == {}
    assert run(sandbox, "print('next')").stdout == b"next\n"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _labeled_container(
    client: docker.DockerClient, image: str, *, expires: float, owner: str
) -> str:
    created = client.api.create_container(
        image,
        labels={LABEL_SANDBOX: "1", LABEL_EXPIRES: str(int(expires)), LABEL_OWNER: owner},
        host_config=client.api.create_host_config(network_mode="none"),
        network_disabled=True,
    )
    return created["Id"]


def test_reap_removes_expired_and_orphaned_containers_only(
    runc_sandbox: DockerSandbox, docker_client: docker.DockerClient, sandbox_image: str
) -> None:
    host, now = socket.gethostname(), time.time()
    expired = _labeled_container(docker_client, sandbox_image, expires=now - 5, owner="elsewhere:1")
    orphaned = _labeled_container(
        docker_client, sandbox_image, expires=now + 3600, owner=f"{host}:{_dead_pid()}"
    )
    live = _labeled_container(
        docker_client, sandbox_image, expires=now + 3600, owner=f"{host}:{os.getpid()}"
    )
    try:
        assert runc_sandbox.reap() == 2
        remaining = {c["Id"] for c in list_sandbox_containers(docker_client)}
        assert expired not in remaining and orphaned not in remaining
        assert live in remaining
        assert runc_sandbox.reap_all() == 1
        assert list_sandbox_containers(docker_client) == []
    finally:
        for cid in (expired, orphaned, live):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(cid, force=True)
