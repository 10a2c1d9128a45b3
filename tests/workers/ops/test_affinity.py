"""`actionfleet worker --cpus` / ``ACTIONFLEET_WORKER_CPUS``: a worker pinned to CPU cores.
The parser on its own, then real workers (a real redis-server) started through the CLI,
whose affinity is read back from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from producer.client import ActionClient
from tests.conftest import (
    ROOT,
    RedisServer,
    Worker,
    cli_process,
    wait_for_worker,
    worker_env,
)
from workers.celery.affinity import CpuSpecError, checked, parse_cpus, pin_pool_process, pool_cpus
from workers.config import Settings

DB = 9  # this module's own Redis database
CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("spec", "cpus"),
    [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("3,1", (1, 3)), ("0, 2-3,2", (0, 2, 3)), ("5-5", (5,))],
)
def test_cpu_lists_in_the_kernels_cpuset_format(spec: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpus(spec) == cpus


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "'' is not a CPU number or a range like 0-3; write e.g. 0, 0-3 or 0,2"),
        ("0,,1", "'' is not a CPU number"),
        ("one", "'one' is not a CPU number"),
        ("2-", "'2-' is not a CPU number"),
        ("-1", "'-1' is not a CPU number"),
        ("3-1", "range '3-1' runs backwards; write 1-3"),
        ("0-99999999999", "CPU 99999999999 is past the kernel's largest (8191)"),
    ],
)
def test_a_bad_cpu_list_says_what_is_wrong_and_what_to_write(spec: str, says: str) -> None:
    with pytest.raises(CpuSpecError) as err:
        parse_cpus(spec)
    assert says in str(err.value)


def test_cpus_this_process_may_not_use_are_refused_with_the_ones_it_may() -> None:
    outside = max(CPUS) + 1
    with pytest.raises(CpuSpecError) as err:
        checked(f"{CPUS[0]},{outside}")
    message = str(err.value)
    assert f"CPU {outside} is not available" in message
    assert f"may run on {','.join(map(str, CPUS))}" in message
    assert checked(str(CPUS[-1])) == (CPUS[-1],)


def test_the_setting_refuses_what_is_not_a_cpu_list() -> None:
    assert Settings(worker_cpus="0-1,3").worker_cpus == "0-1,3"
    assert Settings(worker_cpus=" ").worker_cpus is None, "empty (compose's ${X:-}): float"
    with pytest.raises(ValueError) as err:
        Settings(worker_cpus="0;1")
    assert "CPU list '0;1': '0;1' is not a CPU number or a range like 0-3; write e.g." in str(
        err.value
    )
    with pytest.raises(ValueError) as err:  # what the parser refuses, the setting refuses
        Settings(worker_cpus="3-1")
    assert "range '3-1' runs backwards; write 1-3" in str(err.value)


def test_pool_processes_are_pinned_one_per_cpu_only_when_each_can_have_its_own() -> None:
    assert pool_cpus((0, 1, 2), 3) == (0, 1, 2)
    assert pool_cpus((0, 1, 2), 2) == (0, 1, 2)
    assert pool_cpus((0, 1), 4) is None, "more processes than CPUs: float within the set"
    assert pool_cpus((3,), 1) is None, "one CPU: inherited from the worker"


def test_a_pool_process_takes_the_cpu_of_its_index() -> None:
    before = os.sched_getaffinity(0)
    try:
        for index in range(len(CPUS) + 1):  # wraps: a replacement keeps its index's CPU
            assert pin_pool_process(tuple(CPUS), index) == CPUS[index % len(CPUS)]
            assert os.sched_getaffinity(0) == {CPUS[index % len(CPUS)]}
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize(
    ("spec", "says"),
    [("x", b"'x' is not a CPU number"), (str(max(CPUS) + 1), b"is not available to this process")],
)
def test_the_cli_refuses_a_bad_cpu_list_before_starting_a_worker(
    spec: str, says: bytes, tmp_path: Path
) -> None:
    proc = cli_process(worker_env("redis://127.0.0.1:1/0", tmp_path), "worker", "--cpus", spec)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert out.startswith(b"error: --cpus: CPU list"), out
    assert says in out, out


def test_a_worker_started_with_cpus_outside_its_reach_exits_saying_so(tmp_path: Path) -> None:
    # Plain `celery worker` with the setting: the worker itself checks it before its pool.
    env = worker_env("redis://127.0.0.1:1/0", tmp_path, worker_cpus=str(max(CPUS) + 1))
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "actions.files"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert b"error: ACTIONFLEET_WORKER_CPUS: CPU list" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(("pool", "processes"), [("prefork", 2), ("prefork", 3), ("solo", 1)])
def test_a_pinned_worker_and_its_pool_processes_run_only_on_their_cpus(
    pool: str,
    processes: int,
    redis_server: RedisServer,
    tmp_path: Path,
    make_client: Callable[[str], ActionClient],
) -> None:
    url = redis_server.url(DB)
    redis_server.client(DB).flushdb()
    # solo: the last CPU alone (not the whole machine, or the check could not fail);
    # prefork: two CPUs, one per pool process.
    pinned = CPUS[-1:] if pool == "solo" else CPUS[:2]
    spec = ",".join(map(str, pinned))
    env = worker_env(url, tmp_path, workspace_root=str(tmp_path / "ws"))
    name = f"pinned-{pool}{processes}-{time.monotonic_ns()}@localhost"
    log = tmp_path / "worker.log"
    args = ["worker", "--queues", "files", "--pool", pool, "--cpus", spec, "--name", name]
    if pool == "prefork":
        args += ["--concurrency", str(processes)]
    proc = cli_process(env, *args, stdout=log.open("wb"))
    worker = Worker(name, env, log, proc, ["actions.files"])
    try:
        wait_for_worker(worker, url)
        main = os.sched_getaffinity(proc.pid)
        pools = [os.sched_getaffinity(pid) for pid in worker.pool_pids()]
        client = make_client(url)
        action = {"primitive": "files", "tenant_id": "acme", "agent_id": "pin"}
        result = client.run(
            action | {"payload": {"op": "write", "path": "a.txt", "content": "hi"}}, timeout=60
        )
    finally:
        worker.stop()
    assert result.status == "succeeded", result
    assert main == set(pinned), worker.tail()
    if pool == "solo":
        assert pools == []
    elif len(pinned) > 1 and processes <= len(pinned):  # one CPU each
        assert sorted(pools, key=min) == [{cpu} for cpu in pinned[:processes]], pools
    else:  # more processes than CPUs: each floats within the worker's set
        assert pools == [set(pinned)] * processes, pools
