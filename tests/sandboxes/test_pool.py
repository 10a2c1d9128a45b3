"""The warm container pool (sandboxes/pool.py) against a real Docker engine (runc).

Every run must still get a container no other run has used; what the pool changes is only
when that container was created. Needs the plugin ``tests.fixtures_docker``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest

from sandboxes.base import Limits, RunOutcome, RunSpec
from sandboxes.docker import LABEL_EXPIRES, LABEL_OWNER, DockerSandbox, reap_containers
from sandboxes.pool import LABEL_POOL, PooledDockerSandbox, Profile, _Demand
from sandboxes.reaper import owner_label
from tests.conftest import MARKER_PROGRAM
from tests.fixtures_docker import SandboxFactory

ROOT = Path(__file__).resolve().parents[2]
LIMITS = Limits(timeout_s=10, memory_mb=128, pids=64, output_bytes=65536)
SMALL = Limits(timeout_s=10, memory_mb=64, pids=64, output_bytes=65536)


def pooled(factory: SandboxFactory, **kwargs: object) -> PooledDockerSandbox:
    return PooledDockerSandbox(factory("runc"), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def make_pool(sandbox_factory: SandboxFactory) -> Iterator[Callable[..., PooledDockerSandbox]]:
    made: list[PooledDockerSandbox] = []

    def make(**kwargs: object) -> PooledDockerSandbox:
        pool = pooled(sandbox_factory, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def run(pool: PooledDockerSandbox, source: str, limits: Limits = LIMITS) -> RunOutcome:
    return pool.run(RunSpec(language="python", source=source, limits=limits))


def wait_warm(pool: PooledDockerSandbox, limits: Limits, n: int = 1) -> None:
    """Until ``n`` containers of ``limits`` are warm (not a timing assertion: a bound)."""
    end = time.monotonic() + 60
    while pool.warm_count(limits) < n:
        assert time.monotonic() < end, f"pool never reached {n} warm: {pool.stats}"
        time.sleep(0.05)


def pool_containers(client: docker.DockerClient) -> dict[str, dict[str, str]]:
    found = client.api.containers(all=True, filters={"label": f"{LABEL_POOL}=1"})
    return {c["Id"]: c["Labels"] for c in found}


def exists(client: docker.DockerClient, container_id: str) -> bool:
    return bool(client.api.containers(all=True, filters={"id": container_id}))


class EngineEvents:
    """The engine's container events (kill, die, ...) of this process's pooled containers,
    recorded live from a stream opened before the code under test runs."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._stream = client.events(
            filters={"type": "container", "label": f"{LABEL_OWNER}={owner_label()}"},
            decode=True,
        )
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends with an error on close()
            for event in self._stream:
                self.events.append(event)

    def of(self, container_id: str, until: str = "destroy") -> list[tuple[str, str | None]]:
        """(action, exitCode) of one container's events, once ``until`` arrived (bounded)."""
        end = time.monotonic() + 30
        while time.monotonic() < end:
            mine = [e for e in list(self.events) if e.get("id") == container_id]
            if any(e.get("Action") == until for e in mine):
                break
            time.sleep(0.05)
        return [(e["Action"], e["Actor"]["Attributes"].get("exitCode")) for e in mine]

    def close(self) -> None:
        self._stream.close()
        self._thread.join(5)


# --------------------------------------------------------------------------- basics


def test_warm_run_uses_a_prestarted_container_once_then_removes_it(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    pool = make_pool(max_per_profile=2, prewarm=(LIMITS,))
    wait_warm(pool, LIMITS)
    warm_before = set(pool.warm_ids())
    labels = pool_containers(docker_client)
    for cid in warm_before:  # labelled so that a reaper can find them after a crash
        assert labels[cid][LABEL_OWNER].endswith(f":{os.getpid()}")
        assert float(labels[cid][LABEL_EXPIRES]) > time.time() + 60

    outcome = run(pool, "import sys; print('hi', 6 * 7); print('e', file=sys.stderr); sys.exit(3)")

    assert (outcome.stdout, outcome.stderr, outcome.exit_code) == (b"hi 42\n", b"e\n", 3)
    assert (outcome.timed_out, outcome.oom_killed) == (False, False)
    assert pool.stats["warm_runs"] == 1 and pool.stats["cold_runs"] == 0
    used = [cid for cid in warm_before if cid.startswith(outcome.sandbox_id)]
    assert len(used) == 1, (outcome.sandbox_id, warm_before)
    assert pool.settle()
    assert not exists(docker_client, used[0])
    assert used[0] not in pool.warm_ids()


def test_no_container_serves_two_runs_under_concurrency(
    make_pool: Callable[..., PooledDockerSandbox],
) -> None:
    pool = make_pool(max_per_profile=3, prewarm=(LIMITS,))
    with ThreadPoolExecutor(3) as ex:  # demand of 3 concurrent runs: the pool grows to 3
        list(ex.map(lambda _: run(pool, "pass"), range(3)))
    wait_warm(pool, LIMITS, 3)
    pool.stats.update(warm_runs=0, cold_runs=0)
    with ThreadPoolExecutor(6) as ex:
        outcomes = list(ex.map(lambda _: run(pool, MARKER_PROGRAM), range(30)))

    reports = [json.loads(o.stdout) for o in outcomes]
    assert all(o.exit_code == 0 for o in outcomes), outcomes
    assert [r["seen"] for r in reports] == [[]] * 30  # no run found another run's marker
    ids = [o.sandbox_id for o in outcomes]
    assert len(set(ids)) == 30, ids
    assert all("runner" in r["pid1"] for r in reports)  # the runner is PID 1 every time
    assert pool.stats["warm_runs"] + pool.stats["cold_runs"] == 30
    assert pool.stats["warm_runs"] >= 3


def test_burst_larger_than_the_pool_is_served_cold(
    make_pool: Callable[..., PooledDockerSandbox],
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    wait_warm(pool, LIMITS)
    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(lambda i: run(pool, f"print({i} * 2)"), range(8)))

    assert [o.stdout for o in outcomes] == [f"{i * 2}\n".encode() for i in range(8)]
    assert pool.stats["cold_runs"] >= 1 and pool.stats["warm_runs"] >= 1
    assert pool.stats["cold_runs"] + pool.stats["warm_runs"] == 8
    assert len({o.sandbox_id for o in outcomes}) == 8


def test_workspace_runs_and_unknown_profiles_take_the_cold_path(
    make_pool: Callable[..., PooledDockerSandbox], tmp_path: Path
) -> None:
    pool = make_pool(max_per_profile=2, prewarm=(LIMITS,))
    wait_warm(pool, LIMITS)
    tmp_path.chmod(0o777)
    spec = RunSpec(
        language="python",
        source="import os; print(sorted(os.listdir('/workspace')))",
        limits=LIMITS,
        workspace=(tmp_path, "ro"),
    )
    (tmp_path / "a.txt").write_text("a")
    assert pool.run(spec).stdout == b"['a.txt']\n"
    other = Limits(timeout_s=10, memory_mb=96, pids=64)
    assert run(pool, "print(5)", other).stdout == b"5\n"
    assert pool.stats == pool.stats | {"warm_runs": 0, "cold_runs": 2}
    # Asked-for profiles are warmed for the next runs.
    wait_warm(pool, other)
    assert run(pool, "print(6)", other).stdout == b"6\n"
    assert pool.stats["warm_runs"] == 1


def test_used_and_discarded_containers_exit_by_themselves_before_removal(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    # Force-removing a running container makes the engine kill it (one more runc call and
    # a killed teardown, see benchmarks/engine_capacity.py): the pool lets the runner exit.
    events = EngineEvents(docker_client)
    try:
        pool = make_pool(max_per_profile=2, prewarm=(LIMITS,))
        wait_warm(pool, LIMITS)
        warm = set(pool.warm_ids())
        outcome = run(pool, "print(8)")
        assert outcome.stdout == b"8\n"
        (used,) = [cid for cid in warm if cid.startswith(outcome.sandbox_id)]
        assert pool.settle()  # the used one is gone, its replacements are waiting
        waiting = pool.warm_ids()
        assert waiting
        pool.close()  # closes the stdin of the waiting ones: their runners refuse and exit

        used_events = events.of(used)
        assert ("die", "0") in used_events, used_events  # the runner's own exit after a frame
        assert not [a for a, _ in used_events if a == "kill"], used_events
        assert used_events[-1][0] == "destroy"
        for cid in waiting:
            got = events.of(cid)
            assert ("die", "2") in got, got  # an empty request is refused with exit 2
            assert not [a for a, _ in got if a == "kill"], got
            assert got[-1][0] == "destroy"
    finally:
        events.close()


# --------------------------------------------------------------------------- bad runs


def test_timed_out_container_is_destroyed_not_reused(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    limits = Limits(timeout_s=1, memory_mb=128, pids=64)
    pool = make_pool(max_per_profile=1, prewarm=(limits,))
    wait_warm(pool, limits)
    outcome = run(pool, "open('/tmp/dirty', 'w').write('x')\nwhile True: pass", limits)
    assert outcome.timed_out and outcome.exit_code is None
    assert pool.stats["warm_runs"] == 1
    assert pool.settle()
    full_ids = [c["Id"] for c in docker_client.api.containers(all=True)]
    assert not any(cid.startswith(outcome.sandbox_id) for cid in full_ids)

    wait_warm(pool, limits)
    after = run(pool, "import os; print(os.path.exists('/tmp/dirty'))", limits)
    assert after.stdout == b"False\n" and after.sandbox_id != outcome.sandbox_id
    assert pool.stats["warm_runs"] == 2


def test_oom_killed_container_is_destroyed_not_reused(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(SMALL,))
    wait_warm(pool, SMALL)
    outcome = run(pool, "b = bytearray(400 * 1024 * 1024)\nprint(len(b))", SMALL)
    assert outcome.oom_killed and outcome.stdout == b""
    assert pool.stats["warm_runs"] == 1
    assert pool.settle()
    full_ids = [c["Id"] for c in docker_client.api.containers(all=True)]
    assert not any(cid.startswith(outcome.sandbox_id) for cid in full_ids)
    wait_warm(pool, SMALL)
    after = run(pool, "print('fine')", SMALL)
    assert after.stdout == b"fine\n" and after.sandbox_id != outcome.sandbox_id


def test_container_that_died_while_warm_is_skipped(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    wait_warm(pool, LIMITS)
    (dead,) = pool.warm_ids()
    docker_client.api.remove_container(dead, force=True)  # e.g. an operator's `reap --all`
    outcome = run(pool, "print(7)")
    assert outcome.stdout == b"7\n"
    assert not dead.startswith(outcome.sandbox_id)


# --------------------------------------------------------------------------- sizing


def test_memory_cap_bounds_the_warm_containers(
    make_pool: Callable[..., PooledDockerSandbox],
) -> None:
    # 4 concurrent runs ask for 5 warm containers of 64 MB; 128 MB allows two.
    pool = make_pool(max_per_profile=8, max_memory_mb=128, prewarm=(SMALL,))
    wait_warm(pool, SMALL)
    with ThreadPoolExecutor(4) as ex:
        assert all(o.exit_code == 0 for o in ex.map(lambda _: run(pool, "", SMALL), range(4)))
    assert pool.settle()
    assert pool.warm_count(SMALL) == 2


def test_sustained_rate_sizes_the_pool_ahead_of_demand(
    make_pool: Callable[..., PooledDockerSandbox],
) -> None:
    # One run at a time (peak 1), but 4 runs/s while a warm container takes 0.4 s to make:
    # 1.6 runs arrive while one replacement is made, so 2 must be on the way, not 1.
    # No memory budget: nothing is created, only the target is looked at.
    pool = make_pool(max_per_profile=6, max_memory_mb=0)
    profile = Profile.of(pool.runtime, pool.cold.image, LIMITS)
    now = time.monotonic()
    with pool._lock:
        demand = pool._demand.setdefault(profile, _Demand())
        for i in range(20):  # over the last 5 s, sequential
            demand.note_start(now - 5 + i * 0.25)
            demand.in_flight -= 1
        targets = {}
        for ready_s in (0.0, 0.1, 0.4, 1.0, 10.0):
            pool.ready_s = ready_s
            targets[ready_s] = pool._target(profile, now)
    assert targets == {0.0: 2, 0.1: 2, 0.4: 3, 1.0: 5, 10.0: 6}  # peak 1 + ahead, capped


def test_ready_time_is_measured_from_real_creates(
    make_pool: Callable[..., PooledDockerSandbox],
) -> None:
    pool = make_pool(max_per_profile=1, prewarm=(LIMITS,))
    assert pool.ready_s == 0.0
    wait_warm(pool, LIMITS)
    assert pool.ready_s > 0.0  # the first create set it
    assert pool.stats["created"] == 1


def test_unused_profile_is_drained(make_pool: Callable[..., PooledDockerSandbox]) -> None:
    pool = make_pool(max_per_profile=2, demand_window_s=1.0)
    assert run(pool, "print(1)").stdout == b"1\n"  # cold; makes the profile wanted
    wait_warm(pool, LIMITS)
    end = time.monotonic() + 60
    while pool.warm_count(LIMITS) > 0:
        assert time.monotonic() < end, "an unused profile was never drained"
        time.sleep(0.1)
    assert pool.settle()
    assert pool.warm_count() == 0


# --------------------------------------------------------------------------- lifecycle


def test_close_leaves_no_pooled_container(
    sandbox_factory: SandboxFactory, docker_client: docker.DockerClient
) -> None:
    pool = pooled(sandbox_factory, max_per_profile=3, prewarm=(LIMITS, SMALL))
    wait_warm(pool, LIMITS)
    wait_warm(pool, SMALL)
    run(pool, "print(1)")  # and one more being created right now, most likely
    ids = pool.warm_ids()
    assert ids
    pool.close()
    mine = f":{os.getpid()}"
    left = [
        c for c, lab in pool_containers(docker_client).items() if lab[LABEL_OWNER].endswith(mine)
    ]
    assert left == []
    assert not any(exists(docker_client, cid) for cid in ids)


CRASHING_WORKER = """
import json, os, sys, time
from sandboxes.base import Limits
from sandboxes.docker import DockerSandbox
from sandboxes.pool import PooledDockerSandbox
limits = Limits(timeout_s=10, memory_mb=128, pids=64, output_bytes=65536)
pool = PooledDockerSandbox(DockerSandbox(runtime="runc", image=sys.argv[1]), prewarm=(limits,))
end = time.monotonic() + 60  # bounded, so the test cannot hang on readline()
while pool.warm_count(limits) < 1 and time.monotonic() < end:
    time.sleep(0.05)
print(json.dumps(pool.warm_ids()), flush=True)
time.sleep(600)
"""


def test_crashed_workers_pooled_containers_are_reaped_on_next_start(
    docker_client: docker.DockerClient, sandbox_image: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WORKER, sandbox_image],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ids = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(): the containers stay behind
        proc.wait()
    assert len(ids) >= 1
    assert all(exists(docker_client, cid) for cid in ids)
    assert all(
        pool_containers(docker_client)[cid][LABEL_OWNER].endswith(f":{proc.pid}") for cid in ids
    )

    # What a worker process runs at start-up (workers/app.py _reap_once).
    reaper = DockerSandbox(runtime="runc", image=sandbox_image, client=docker_client)
    assert reaper.reap() >= len(ids)
    assert not any(exists(docker_client, cid) for cid in ids)


def test_live_pools_containers_survive_another_process_reaping(
    make_pool: Callable[..., PooledDockerSandbox], docker_client: docker.DockerClient
) -> None:
    pool = make_pool(max_per_profile=2, prewarm=(LIMITS,))
    wait_warm(pool, LIMITS)
    ids = pool.warm_ids()
    reap_containers(docker_client)  # owner alive, expiry ahead: not stale
    assert all(exists(docker_client, cid) for cid in ids)
    assert run(pool, "print(3)").stdout == b"3\n"
    assert pool.stats["warm_runs"] == 1


@pytest.mark.gvisor
def test_gvisor_warm_run_takes_the_last_frame_after_exit(
    sandbox_factory: SandboxFactory, docker_client: docker.DockerClient
) -> None:
    pool = PooledDockerSandbox(sandbox_factory("runsc"), max_per_profile=1, prewarm=(LIMITS,))
    try:
        wait_warm(pool, LIMITS)
        outcome = run(pool, "import sys; print('g'); sys.exit(4)")
        assert (outcome.stdout, outcome.exit_code, outcome.runtime) == (b"g\n", 4, "runsc")
        assert pool.stats["warm_runs"] == 1
        assert pool.settle()
        full_ids = [c["Id"] for c in docker_client.api.containers(all=True)]
        assert not any(cid.startswith(outcome.sandbox_id) for cid in full_ids)
    finally:
        pool.close()
