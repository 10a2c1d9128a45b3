"""Finding and removing what dead sandbox runs left behind.

Every sandbox container carries labels so that any process can tell whether it is still
someone's live run: ``actionfleet.sandbox=1``, ``actionfleet.owner=<host>:<pid>`` and
``actionfleet.expires=<unix time>``. A container is stale when it is past its expiry (any
host) or its owner process on this host is gone (a zombie counts as gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import Any

import docker
import docker.errors

from producer.procs import pid_alive
from sandboxes.base import RunSpec

__all__ = [
    "EXPIRY_SLACK_S",
    "LABEL_EXPIRES",
    "LABEL_OWNER",
    "LABEL_PREFIX",
    "LABEL_RUNTIME",
    "LABEL_SANDBOX",
    "SANDBOX_FILTER",
    "end_orphaned_runtime_processes",
    "is_stale",
    "list_sandbox_containers",
    "owner_label",
    "reap_containers",
    "run_labels",
]

log = logging.getLogger(__name__)

LABEL_PREFIX = "actionfleet."
LABEL_SANDBOX = "actionfleet.sandbox"
LABEL_OWNER = "actionfleet.owner"
LABEL_EXPIRES = "actionfleet.expires"
LABEL_RUNTIME = "actionfleet.runtime"
SANDBOX_FILTER = {"label": f"{LABEL_SANDBOX}=1"}
# A failed gVisor start can leave its containerd shim running; these name such processes.
RUNTIME_PROCESS_PREFIXES = (b"containerd-shim", b"runsc")
ORPHAN_SETTLE_S = 1.0
# Beyond timeout + grace, how long a container may exist before any process may reap it:
# covers a slow create/start, sending a large stdin, reading the output and removing.
EXPIRY_SLACK_S = 60.0


def owner_label() -> str:
    """``<host>:<pid>`` of this process: who is responsible for a container."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_labels(spec: RunSpec, runtime: str, kill_grace_s: float) -> dict[str, str]:
    """The labels of a cold run's container: the caller's (prefixed), then ours, which
    they cannot override; it expires when no run could still legitimately need it."""
    expires = time.time() + spec.limits.timeout_s + kill_grace_s + EXPIRY_SLACK_S
    labels = {f"{LABEL_PREFIX}{k}": str(v) for k, v in spec.labels.items()}
    labels.update(
        {
            LABEL_SANDBOX: "1",
            LABEL_OWNER: owner_label(),
            LABEL_EXPIRES: str(int(expires) + 1),
            LABEL_RUNTIME: runtime,
        }
    )
    return labels


def list_sandbox_containers(client: docker.DockerClient) -> list[dict[str, Any]]:
    """Every ActionFleet sandbox container the engine has, running or not (API dicts)."""
    return client.api.containers(all=True, filters=SANDBOX_FILTER)


def is_stale(labels: dict[str, str], now: float, host: str) -> bool:
    """Past its expiry, or owned by a process of this host that no longer exists."""
    try:
        if float(labels.get(LABEL_EXPIRES, "0")) < now:
            return True
    except ValueError:
        return True  # a sandbox label we cannot read is nobody's live run
    owner_host, _, owner_pid = labels.get(LABEL_OWNER, "").rpartition(":")
    if owner_host == host and owner_pid.isdigit():
        return not pid_alive(int(owner_pid))
    return False


def reap_containers(client: docker.DockerClient, *, everything: bool = False) -> int:
    """Remove stale sandbox containers (or all of them); returns how many were removed."""
    now, host, removed = time.time(), socket.gethostname(), 0
    for info in list_sandbox_containers(client):
        if not everything and not is_stale(info.get("Labels") or {}, now, host):
            continue
        try:
            client.api.remove_container(info["Id"], force=True)
            removed += 1
        except docker.errors.NotFound:
            pass  # its own run removed it meanwhile
        except docker.errors.APIError as exc:
            log.warning("could not reap sandbox container %s: %s", info["Id"][:12], exc)
    return removed


def _runtime_processes_of(container_id: str) -> list[int]:
    """Local containerd-shim / runsc processes whose command line names ``container_id``."""
    needle, found = container_id.encode(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # exited meanwhile
        program = os.path.basename(cmdline.split(b"\0", 1)[0])
        if program.startswith(RUNTIME_PROCESS_PREFIXES) and needle in cmdline:
            found.append(int(entry.name))
    return found


def end_orphaned_runtime_processes(container_id: str) -> int:
    """Kill what a failed start left behind for a container that is already removed.

    Measured here: when gVisor fails at "starting sandbox" (e.g. a bad mount), dockerd
    reports the error and removes the container, but its containerd-shim keeps running
    forever. Only processes naming this exact container id are touched, after a short
    wait in which a healthy shim exits by itself. Returns how many were killed. A no-op
    when the engine runs on another host (nothing local names the id).
    """
    deadline = time.monotonic() + ORPHAN_SETTLE_S
    while (pids := _runtime_processes_of(container_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        log.warning("killed %d orphaned runtime process(es) of %s", len(pids), container_id[:12])
        # SIGKILL is asynchronous. containerd notices the dead shim and runs its own
        # cleanup (`containerd-shim ... delete`, `runsc delete`), which must be left alone.
        deadline = time.monotonic() + ORPHAN_SETTLE_S
        while set(pids) & set(_runtime_processes_of(container_id)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    return len(pids)
