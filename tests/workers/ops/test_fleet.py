"""The code primitive end to end: ActionClient / CLI -> Redis -> Celery worker -> container.

Real redis-server, real Celery worker subprocesses, real Docker containers, under runc and
under gVisor (runsc).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer.client import ActionClient
from producer.errors import InvalidAction
from tests.conftest import ROOT, RedisServer, Worker, code_action, start_worker

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.gvisor)]


@pytest.fixture(scope="module", params=RUNTIMES)
def fleet(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    sandbox_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Worker]]:
    """One code worker per runtime, each on its own Redis database."""
    runtime = request.param
    db = 1 if runtime == "runc" else 2
    url = redis_server.url(db)
    home = tmp_path_factory.mktemp(f"fleet-{runtime}")
    worker = start_worker(url, home, sandbox_runtime=runtime, concurrency=2)
    yield url, worker
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()


@pytest.fixture
def client(fleet: tuple[str, Worker], make_client: Callable[[str], ActionClient]) -> ActionClient:
    return make_client(fleet[0])


def _runtime(worker: Worker) -> str:
    return worker.env["ACTIONFLEET_SANDBOX_RUNTIME"]


def test_round_trip_through_client(client: ActionClient, fleet: tuple[str, Worker]) -> None:
    result = client.run(code_action("import sys; print('hi', 6 * 7); sys.exit(0)"), timeout=60)
    assert result.status == "succeeded", result
    assert result.output is not None
    assert result.output["stdout"] == "hi 42\n"
    assert result.output["exit_code"] == 0
    assert result.output["usage"]["runtime"] == _runtime(fleet[1])
    assert result.worker == fleet[1].name
    assert result.duration_ms > 0 and result.attempt == 1

    bash = client.run(code_action("echo out; echo err >&2; exit 7", "bash"), timeout=60)
    assert bash.status == "succeeded"
    assert bash.output is not None
    assert (bash.output["stdout"], bash.output["stderr"], bash.output["exit_code"]) == (
        "out\n",
        "err\n",
        7,
    )


def test_round_trip_through_cli_submit(fleet: tuple[str, Worker], tmp_path: Path) -> None:
    _url, worker = fleet
    action = json.dumps(code_action("print(sum(range(10)))"))
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", "-", "--timeout", "60"],
        input=action,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=worker.env,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "succeeded"
    assert result["output"]["stdout"] == "45\n"

    failing = json.dumps(code_action("while True: pass", timeout_s=1))
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", failing, "--timeout", "60"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=worker.env,
        timeout=90,
    )
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "timed_out"


@pytest.mark.parametrize(
    "raw",
    [
        {"primitive": "code", "tenant_id": "acme", "payload": {"language": "python"}},
        code_action("print(1)", memory_mb="a lot"),
        code_action("print(1)") | {"primitive": "telepathy"},
        code_action("print(1)") | {"sudo": True},
        code_action("x" * 300_000),
        code_action("print(1)", timeout_s=86_400 * 365),
        code_action("print(1)", memory_mb=1 << 30),
        # Every primitive has an executor now: an invalid browse payload instead.
        {
            "primitive": "browse",
            "tenant_id": "a",
            "agent_id": "b",
            "payload": {"url": "x", "extract": ["pdf"]},
        },
    ],
    ids=[
        "missing",
        "wrong-type",
        "unknown-primitive",
        "unknown-field",
        "oversized-source",
        "absurd-timeout",
        "absurd-memory",
        "browse-bad-extract",
    ],
)
def test_invalid_messages_never_reach_the_broker(
    raw: dict,
    redis_server: RedisServer,
    make_client: Callable[[str], ActionClient],
    tmp_path: Path,
) -> None:
    # A database no worker reads: anything sent would still be sitting there.
    db = 9
    redis_server.client(db).flushdb()
    client = make_client(redis_server.url(db))
    with pytest.raises(InvalidAction) as info:
        client.submit(raw)
    assert info.value.errors and all(e["field"] and e["fix"] for e in info.value.errors)
    with pytest.raises(InvalidAction):
        client.submit_many([code_action("print(1)"), raw])

    env = {
        "PATH": "/usr/bin:/bin",
        "ACTIONFLEET_BROKER_URL": redis_server.url(db),
        "ACTIONFLEET_HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", "-"],
        input=json.dumps(raw),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert json.loads(out.stdout)["error"]["details"]["errors"]
    assert redis_server.client(db).dbsize() == 0


def test_message_headers_name_the_action_not_its_payload(
    redis_server: RedisServer, make_client: Callable[[str], ActionClient]
) -> None:
    # Celery copies a repr of the task arguments into the message headers, which Flower
    # and worker logs show unredacted: the payload must only travel in the body.
    import base64

    db = 9
    redis_server.client(db).flushdb()
    client = make_client(redis_server.url(db))
    marker = "s3cr3t-payload-marker"
    handle = client.submit(code_action(f"print({marker!r})"))
    raw = [
        v
        for k in redis_server.client(db).keys("actions.code*")
        for v in redis_server.client(db).lrange(k, 0, -1)
    ]
    assert len(raw) == 1
    message = json.loads(raw[0])
    headers = json.dumps(message["headers"])
    assert marker not in headers
    assert handle.action_id in message["headers"]["kwargsrepr"]
    assert message["headers"]["argsrepr"] == "()"
    assert marker in base64.b64decode(message["body"]).decode()  # the body carries it


def _containers_of(docker_client, action_id: str) -> list:
    # The engine's own list: docker-py's containers.list inspects each listed container
    # afterwards and fails whole when one was removed in between.
    return docker_client.api.containers(
        all=True, quiet=True, filters={"label": f"actionfleet.action_id={action_id}"}
    )


def test_infinite_loop_times_out_and_its_container_is_gone(
    client: ActionClient, docker_client
) -> None:
    timeout = 2.0
    handle = client.submit(
        code_action("print('start', flush=True)\nwhile True: pass", timeout_s=timeout)
    )
    result = handle.result(timeout=60)
    assert result.status == "timed_out"
    assert result.error is not None and result.error.type == "timeout"
    # A hang would run on; the slack only absorbs a slow container start (not a timing).
    assert result.duration_ms <= (timeout + 10) * 1000, result.duration_ms
    assert result.output is not None and result.output["stdout"] == "start\n"
    assert _containers_of(docker_client, handle.action_id) == []


def test_memory_bomb_is_resource_exhausted(client: ActionClient) -> None:
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    result = client.run(code_action(bomb, memory_mb=64), timeout=90)
    assert result.status == "failed", result
    assert result.error is not None and result.error.type == "resource_exhausted"
    assert "64 MB" in result.error.message


def test_fork_bomb_is_contained_and_worker_survives(
    client: ActionClient, fleet: tuple[str, Worker]
) -> None:
    bomb = "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived"
    result = client.run(code_action(bomb, "bash", timeout_s=8), timeout=90)
    assert result.status in {"succeeded", "timed_out"}, result
    assert fleet[1].proc.poll() is None
    after = client.run(code_action("print('still serving')"), timeout=60)
    assert after.status == "succeeded"
    assert after.output is not None and after.output["stdout"] == "still serving\n"


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[object]]]:
    """A TCP server on the host's loopback that records every connection it accepts."""
    seen: list[object] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except OSError:
                continue
            seen.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], seen
    stop.set()
    thread.join()
    srv.close()


def test_code_has_no_network(client: ActionClient, loopback_server) -> None:
    port, seen = loopback_server
    probe = (
        "import socket\n"
        "for target in [('127.0.0.1', PORT), ('localhost', PORT)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=2).close(); print('connected')\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n"
        "try:\n"
        "    socket.getaddrinfo('actionfleet-test.invalid', 80); print('resolved')\n"
        "except OSError:\n"
        "    print('no dns')\n"
    ).replace("PORT", str(port))
    result = client.run(code_action(probe), timeout=60)
    assert result.status == "succeeded", result
    assert result.output is not None
    lines = result.output["stdout"].splitlines()
    assert lines[-1] == "no dns" and "connected" not in lines, lines
    assert seen == []  # the host's server never heard from the sandbox


def test_actions_cannot_see_each_others_files(client: ActionClient) -> None:
    write = (
        "open('/work/secret.txt', 'w').write('s1')\nopen('/tmp/t.txt', 'w').write('t')\nprint('ok')"
    )
    first = client.run(code_action(write), timeout=60)
    assert first.status == "succeeded" and first.output is not None
    assert first.output["stdout"] == "ok\n"
    look = "import os; print(sorted(os.listdir('/work')), sorted(os.listdir('/tmp')))"
    second = client.run(code_action(look), timeout=60)
    assert second.output is not None
    assert "secret.txt" not in second.output["stdout"], second.output
    assert "t.txt" not in second.output["stdout"], second.output


def test_policy_ceiling_is_denied(client: ActionClient) -> None:
    result = client.run(code_action("print(1)", memory_mb=2048), timeout=60)
    assert result.status == "denied"
    assert result.error is not None and result.error.type == "policy_denied"
    assert result.error.details["limit"] == 512


def test_submit_many_keeps_order(client: ActionClient) -> None:
    handles = client.submit_many([code_action(f"print({i})") for i in range(6)])
    outputs = [h.result(timeout=120).output for h in handles]
    assert [o["stdout"] for o in outputs if o] == [f"{i}\n" for i in range(6)]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("runtime", ["runc"])
def test_sigkill_of_worker_process_redelivers(
    runtime: str,
    redis_server: RedisServer,
    sandbox_image: str,
    docker_client,
    make_client: Callable[[str], ActionClient],
    tmp_path: Path,
) -> None:
    """The pool process running an action is SIGKILLed: the action runs again, completes."""
    url = redis_server.url(3)
    worker = start_worker(url, tmp_path / "w", concurrency=1, sandbox_runtime=runtime)
    try:
        client = make_client(url)
        handle = client.submit(code_action("import time; time.sleep(3); print('done')"))
        _wait_for(
            lambda: bool(_containers_of(docker_client, handle.action_id)),
            30,
            "the action's container",
        )
        (child,) = worker.pool_pids()
        subprocess.run(["kill", "-9", str(child)], check=True)
        result = handle.result(timeout=90)
        assert result.status == "succeeded", result
        assert result.output is not None and result.output["stdout"] == "done\n"
        assert child not in worker.pool_pids()
    finally:
        worker.stop()


def test_sigkill_of_whole_worker_redelivers_to_next_worker(
    redis_server: RedisServer,
    sandbox_image: str,
    docker_client,
    make_client: Callable[[str], ActionClient],
    tmp_path: Path,
) -> None:
    """The whole worker (main process too) dies: after the visibility timeout, another
    worker gets the unacknowledged action."""
    url = redis_server.url(4)
    first = start_worker(url, tmp_path / "a", concurrency=1, visibility_timeout_s="5")
    client = make_client(url)
    handle = client.submit(code_action("import time; time.sleep(4); print('done')"))
    try:
        _wait_for(
            lambda: bool(_containers_of(docker_client, handle.action_id)),
            30,
            "the action's container",
        )
        for pid in [*first.pool_pids(), first.proc.pid]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        first.proc.wait(10)
    finally:
        first.stop(signal.SIGKILL)
    second = start_worker(url, tmp_path / "b", concurrency=1, visibility_timeout_s="5")
    try:
        result = handle.result(timeout=90)
        assert result.status == "succeeded", result
        assert result.worker == second.name
        assert result.output is not None and result.output["stdout"] == "done\n"
    finally:
        second.stop()


def test_an_action_is_delivered_to_its_own_queue_only(
    redis_server: RedisServer, make_client: Callable[[str], ActionClient], tmp_path: Path
) -> None:
    """Workers of other primitives declare their queues (and bindings) on the broker; a code
    action must still land on actions.code alone, never on their queues too."""
    from workers.ops.fleet import queue_depths

    url = redis_server.url(10)
    redis_server.client(10).flushdb()
    others = start_worker(url, tmp_path / "w", queues="actions.files,actions.email")
    try:
        others.stop()  # bindings stay declared; nothing consumes now
        client = make_client(url)
        for _ in range(3):
            client.submit(code_action("print(1)"))
        depths = queue_depths(redis_server.client(10), ["code", "files", "email", "api"])
        assert depths == {
            "actions.code": 3,
            "actions.files": 0,
            "actions.email": 0,
            "actions.api": 0,
        }
    finally:
        others.stop()
