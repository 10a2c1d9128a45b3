"""Pytest plugin: a real Docker engine, the sandbox image and sandboxes for tests.

Load it with ``pytest_plugins = ["tests.fixtures_docker"]`` (or ``-p tests.fixtures_docker``).
Locally a missing engine or gVisor skips the tests that need them; under ``CI=true`` it fails
them (``tests.services.require``). When any test used the engine, the session ends with a
check that no sandbox container (label ``actionfleet.sandbox=1``) and no runtime process of
a removed container is left: leftovers are a bug, so they fail the session (after cleanup).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests.exceptions

from sandboxes.base import Runtime
from sandboxes.docker import DockerSandbox, list_sandbox_containers
from sandboxes.image import ensure_image
from tests.services import require

SandboxFactory = Callable[..., DockerSandbox]

_state: dict[str, Any] = {"engine_used": False}
_CONTAINER_ID = re.compile(r"\b[0-9a-f]{64}\b")
_RUNTIME_PROCESSES = ("runsc", "containerd-shim")
LEFTOVER_SETTLE_S = 10.0


def _engine() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return None
    return client


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of a responding Docker engine."""
    client = _engine()
    require(client is not None, "Docker engine (the default socket must answer `docker info`)")
    assert client is not None
    _state["engine_used"] = True
    yield client
    client.close()


@pytest.fixture(scope="session")
def sandbox_image(docker_client: docker.DockerClient) -> str:
    """The sandbox image tag; built on first use (~40 s), cached in the engine after."""
    return ensure_image()


@pytest.fixture(scope="session")
def sandbox_factory(
    docker_client: docker.DockerClient, sandbox_image: str
) -> Iterator[SandboxFactory]:
    """``make(runtime="runc", **kwargs) -> DockerSandbox`` sharing the session's client."""
    made: list[DockerSandbox] = []

    def make(runtime: Runtime = "runc", **kwargs: Any) -> DockerSandbox:
        if runtime == "runsc":
            runtimes = docker_client.info().get("Runtimes") or {}
            require("runsc" in runtimes, "gVisor runtime `runsc` registered in dockerd")
        sandbox = DockerSandbox(
            runtime=runtime, image=sandbox_image, client=docker_client, **kwargs
        )
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.close()


@pytest.fixture(scope="session")
def runc_sandbox(sandbox_factory: SandboxFactory) -> DockerSandbox:
    return sandbox_factory("runc")


@pytest.fixture(scope="session")
def runsc_sandbox(sandbox_factory: SandboxFactory) -> DockerSandbox:
    return sandbox_factory("runsc")


# --------------------------------------------------------------------------- leftovers


def _runtime_process_ids() -> dict[int, set[str]]:
    """Container ids named on the command line of runsc / containerd-shim processes."""
    found: dict[int, set[str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if not argv or not os.path.basename(argv[0].decode(errors="replace")).startswith(
            _RUNTIME_PROCESSES
        ):
            continue
        ids = set(_CONTAINER_ID.findall(b" ".join(argv).decode(errors="replace")))
        if ids:
            found[int(proc.name)] = ids
    return found


def orphan_runtime_processes(client: docker.DockerClient) -> dict[int, set[str]]:
    """runsc/shim processes serving containers the engine no longer has (a failed start)."""
    known = {c["Id"] for c in client.api.containers(all=True)}
    return {pid: ids for pid, ids in _runtime_process_ids().items() if not ids & known}


def settled_orphan_runtime_processes(client: docker.DockerClient) -> dict[int, set[str]]:
    """``orphan_runtime_processes`` once transient ones are gone: a shim outlives its removed
    container by a moment, and containerd's cleanup of a dead shim runs a few more."""
    deadline = time.monotonic() + LEFTOVER_SETTLE_S
    while (orphans := orphan_runtime_processes(client)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return orphans


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_sandboxes() -> Iterator[None]:
    yield
    if not _state["engine_used"]:
        return
    client = _engine()
    if client is None:
        pytest.fail("the Docker engine stopped answering during the session", pytrace=False)
    try:
        leftovers = list_sandbox_containers(client)
        for info in leftovers:
            with contextlib.suppress(docker.errors.NotFound):  # its own run removed it
                client.api.remove_container(info["Id"], force=True)
        orphans = settled_orphan_runtime_processes(client)
    finally:
        client.close()
    problems = []
    if leftovers:
        names = ", ".join(f"{c['Id'][:12]} {c.get('Labels')}" for c in leftovers)
        problems.append(f"{len(leftovers)} sandbox container(s) left behind: {names}")
    if orphans:
        problems.append(f"runtime processes of removed containers still running: {orphans}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
