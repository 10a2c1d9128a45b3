"""The Docker sandbox backend: one fresh, locked-down container per run (runc or gVisor).

A run, step by step::

    create (stdin open, once)  ->  attach a stdin socket  ->  start  ->  send the framed
    request and half-close (EOF for the runner)  ->  wait(timeout + grace)  ->  read the
    runner's result frame from the container log  ->  inspect State  ->  remove (always)

The runner (``sandboxes/image/runner.py``, PID 1 in the container; the docstring of
``_runner_main.py`` documents the wire protocol) enforces the program's deadline and output
bounds itself. This side is the hard backstop: if the container is still running
``kill_grace_s`` after the deadline it is killed, and whatever happens the container is
removed in ``finally``.

Timeouts: ``timed_out`` is the runner's report (it SIGKILLed the program at the deadline), or
the host watchdog fired (then there is no frame).

OOM: on cgroup v1 the kernel usually picks the program (the runner raises its
oom_score_adj), the runner survives and reports ``oom_killed`` from the cgroup's
``memory.oom_control`` ``oom_kill`` counter. If the runner itself dies with exit 137 and
no frame, that is also treated as OOM: nothing inside the container can SIGKILL PID 1 (the
kernel ignores such signals from inside its PID namespace), and when our watchdog did not
kill it either, the OOM killer did. Docker's ``State.OOMKilled`` is OR-ed in as well.

Network: every container gets ``network_mode="none"``. ``RunSpec.network=True`` is reserved
for a later egress-filtered mode and is currently run with no network too (logged once).

Leftovers (a worker that died mid-run, a daemon hiccup on remove) carry labels so that
``reap()`` can find them: ``actionfleet.sandbox=1``, ``actionfleet.owner=<host>:<pid>`` and
``actionfleet.expires=<unix time>`` after which no run could still legitimately need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig, Mount, Ulimit

from producer.errors import SandboxError
from sandboxes.base import (
    SANDBOX_UID,
    WORKSPACE_MOUNT,
    Limits,
    RunOutcome,
    RunSpec,
    Runtime,
    Warm,
)
from sandboxes.config import sandbox_settings
from sandboxes.frames import (
    encode_request,
    fd_closed,
    frame_outcome,
    json_frame,
    killed_outcome,
    parse_frame,
    read_frame,
)
from sandboxes.image import ensure_image
from sandboxes.reaper import (
    LABEL_EXPIRES,
    LABEL_OWNER,
    LABEL_PREFIX,
    LABEL_SANDBOX,
    end_orphaned_runtime_processes,
    list_sandbox_containers,
    reap_containers,
    run_labels,
)

__all__ = [
    "LABEL_EXPIRES",
    "LABEL_OWNER",
    "LABEL_PREFIX",
    "LABEL_SANDBOX",
    "DockerSandbox",
    "close_stdin",
    "encode_request",
    "end_orphaned_runtime_processes",
    "json_frame",
    "list_sandbox_containers",
    "parse_frame",
    "reap_containers",
]

log = logging.getLogger(__name__)


# Bound for the Docker calls around a run (create, start, logs, inspect, remove).
API_TIMEOUT_S = 60
SEND_TIMEOUT_S = 30.0
# How long retiring a used container waits for its runner's own exit before forcing it.
RETIRE_EXIT_WAIT_S = 5.0
STDERR_TAIL_BYTES = 2000
EXIT_SIGKILL = 128 + signal.SIGKILL  # 137: how Docker reports a SIGKILLed PID 1
# gVisor (ptrace platform) runs its kernel as host threads plus a stub process per guest
# process, all in the container's pids cgroup: ~45 host tasks when idle and ~8.5 per guest
# process (measured). Hitting that cgroup limit crashes the sentry (exit 2, no result), so
# under runsc the guest's process count is limited by RLIMIT_NPROC (which gVisor enforces
# per sandbox) and the host cgroup limit is only a backstop sized above it.
RUNSC_HOST_TASKS_BASE = 64
RUNSC_HOST_TASKS_PER_PROC = 20  # a bash fork bomb crashed the sentry at 10, not at 16


class DockerSandbox:
    """``Sandbox`` backed by the local Docker engine. Thread-safe; one per worker process.

    ``client``: a docker client to use (not closed by ``close()``); by default one is made
    from the environment and owned. ``image``: by default the built sandbox image
    (``ensure_image()`` builds it on first use, ~40 s). ``kill_grace_s``: how long after the
    deadline the host kills a container whose runner did not finish.
    """

    def __init__(
        self,
        runtime: Runtime | None = None,
        image: str | None = None,
        client: docker.DockerClient | None = None,
        *,
        kill_grace_s: float = 2.0,
    ) -> None:
        self.runtime: Runtime = runtime or sandbox_settings().sandbox_runtime
        self._owns_client = client is None
        try:
            self._client = client or docker.from_env(timeout=API_TIMEOUT_S)
        except docker.errors.DockerException as exc:
            raise SandboxError(f"no Docker engine answers: {exc}") from exc
        self.image = image or ensure_image()
        self.kill_grace_s = kill_grace_s
        self._warned_network = False

    # ------------------------------------------------------------------ Sandbox protocol

    def run(self, spec: RunSpec) -> RunOutcome:
        """Run ``spec`` in a fresh container; program failures are in the outcome."""
        self._note_network(spec)
        nonce = secrets.token_hex(16)
        started = time.monotonic()
        container_id, started_ok = "", False
        max_procs = spec.limits.pids if self.runtime == "runsc" else None
        request = encode_request(spec, nonce, max_procs=max_procs)
        try:
            container_id = self._create(spec)
            with self._stdin_socket(container_id) as sock:  # attached before start
                self._api.start(container_id)
                started_ok = True
                self._send(container_id, sock, request)
            watchdog_fired = self._wait(container_id, spec.limits.timeout_s)
            frame = parse_frame(self._logs(container_id, stdout=True), nonce)
            state = self._api.inspect_container(container_id)["State"]
            wall_ms = int((time.monotonic() - started) * 1000)
            return self._outcome(container_id, frame, state, watchdog_fired, wall_ms)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            where = f" (container {container_id[:12]})" if container_id else ""
            raise SandboxError(f"sandbox run failed{where}: {exc}") from exc
        finally:
            if container_id:
                self._abandon(container_id, started_ok)

    def reap(self) -> int:
        """Remove expired sandbox containers and ones whose owning process on this host died."""
        return reap_containers(self._client)

    def reap_all(self) -> int:
        """Remove every sandbox container, live or not (test teardown, ``sandbox reap --all``)."""
        return reap_containers(self._client, everything=True)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # ------------------------------------------------------------------ warm (WarmBackend)

    def start_warm(self, limits: Limits, labels: dict[str, str]) -> Warm:
        """Create, attach (stdin, and stdout for the frame) and start a container whose
        runner waits for its request (``sandboxes.pool``)."""
        cid, started_ok = "", False
        try:
            cid = self._create(RunSpec(language="python", source="", limits=limits), labels)
            wrapper, sock = self._attach_stdin(cid, stdout=True)
            try:
                self._api.start(cid)
                started_ok = True
            except BaseException:
                close_stdin(wrapper, sock)
                raise
            warm = Warm(cid, float(labels[LABEL_EXPIRES]), time.time(), (wrapper, sock))
            cid = ""  # handed over
            return warm
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise SandboxError(f"could not start a warm sandbox container: {exc}") from exc
        finally:
            if cid:  # not handed over
                self._abandon(cid, started_ok)

    def warm_alive(self, warm: Warm) -> bool:
        return not fd_closed(warm.handle[1])

    def run_warm(self, warm: Warm, spec: RunSpec) -> RunOutcome:
        """Send the request to a warm container and decide the outcome as ``run`` does."""
        cid, (wrapper, sock) = warm.id, warm.handle
        self._note_network(spec)
        nonce = secrets.token_hex(16)
        max_procs = spec.limits.pids if self.runtime == "runsc" else None
        started = time.monotonic()
        deadline = started + spec.limits.timeout_s + self.kill_grace_s
        try:
            try:
                self._send(cid, sock, encode_request(spec, nonce, max_procs=max_procs))
                frame, watchdog_fired = read_frame(sock, nonce, deadline, spec.limits)
            finally:
                close_stdin(wrapper, sock)
            if frame is not None and self.runtime == "runc":
                # The fast path: the frame is final (see read_frame), so the container's exit
                # is not waited for (~40 ms of runtime teardown under runc). The runner's own
                # cgroup OOM counter stands in for Docker's State.OOMKilled. Not under gVisor:
                # there a program can open the runner's stdout (/proc/1/fd/1), so only the
                # LAST nonce line after the container's exit is trusted, as on the cold path.
                wall_ms = int((time.monotonic() - started) * 1000)
                return self._outcome(cid, frame, {}, False, wall_ms)
            # No frame on the stream: the runner died, or missed its deadline. Decide exactly
            # as a cold run does, from the exit state and the log.
            if watchdog_fired:
                log.warning("sandbox %s outlived its deadline; killing it", cid[:12])
                with contextlib.suppress(docker.errors.APIError):
                    self._api.kill(cid)
            self._api.wait(cid, timeout=API_TIMEOUT_S)
            frame = parse_frame(self._logs(cid, stdout=True), nonce)
            state = self._api.inspect_container(cid)["State"]
            wall_ms = int((time.monotonic() - started) * 1000)
            return self._outcome(cid, frame, state, watchdog_fired, wall_ms)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise SandboxError(f"sandbox run failed (warm container {cid[:12]}): {exc}") from exc

    def retire(self, warm: Warm) -> None:
        # Closing stdin is EOF for a runner still waiting: it refuses the empty request and
        # exits by itself, so retiring it needs no kill.
        close_stdin(*warm.handle)
        self._retire(warm.id)

    # ------------------------------------------------------------------ steps

    @property
    def _api(self) -> docker.APIClient:
        return self._client.api

    def _note_network(self, spec: RunSpec) -> None:
        if spec.network and not self._warned_network:
            self._warned_network = True
            log.warning("RunSpec.network=True is not implemented yet; running with no network")

    def _labels(self, spec: RunSpec) -> dict[str, str]:
        return run_labels(spec, self.runtime, self.kill_grace_s)

    def _host_config(self, limits: Limits, spec: RunSpec | None = None) -> dict[str, Any]:
        # exec is allowed so `chmod +x x.sh && ./x.sh` works; the program can run arbitrary
        # code anyway. nosuid/nodev are what matter; size bounds memory use of the tmpfs.
        tmpfs_opts = f"rw,nosuid,nodev,exec,size={limits.tmpfs_mb}m,mode=1777"
        memory = f"{limits.memory_mb}m"
        return self._api.create_host_config(
            mounts=_workspace_mounts(spec),
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": tmpfs_opts, "/work": tmpfs_opts},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=memory,
            memswap_limit=memory,  # equal: no swap, so a memory bomb hits the OOM killer
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=self._host_pids_limit(limits),
            ulimits=[
                Ulimit(name="nofile", soft=1024, hard=1024),
                Ulimit(name="core", soft=0, hard=0),
            ],
            ipc_mode="private",
            init=False,  # the runner is PID 1 and reaps
            runtime=self.runtime,
            # Explicit, because the result frame is read back from the log; a daemon
            # default of "none" or "syslog" would lose it.
            log_config=LogConfig(type="json-file", config={}),
        )

    def _host_pids_limit(self, limits: Limits) -> int:
        if self.runtime == "runsc":
            return RUNSC_HOST_TASKS_BASE + RUNSC_HOST_TASKS_PER_PROC * limits.pids
        return limits.pids

    def _create(self, spec: RunSpec, labels: dict[str, str] | None = None) -> str:
        """Create (not start) a container for ``spec``; ``labels`` replace the run's own
        (the warm pool labels containers made before any action is known)."""
        try:
            created = self._api.create_container(
                self.image,
                name=f"actionfleet-sbx-{secrets.token_hex(6)}",
                user=f"{SANDBOX_UID}:{SANDBOX_UID}",
                # With detach=False, docker-py also sets StdinOnce: the runner's stdin closes
                # when our attach connection half-closes, which is the request's end.
                stdin_open=True,
                detach=False,
                tty=False,
                network_disabled=True,
                hostname="sandbox",
                labels=labels if labels is not None else self._labels(spec),
                host_config=self._host_config(spec.limits, spec),
            )
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(
                f"sandbox image {self.image} is missing; build it with sandboxes.image"
                ".build_image()"
            ) from exc
        return created["Id"]

    def _send(self, container_id: str, sock: socket.socket, request: bytes) -> None:
        """Send the request, then half-close: with StdinOnce the runner sees EOF."""
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # The runner died before reading everything (e.g. OOM at start). The outcome is
            # decided from its state, not from this error.
            log.debug("sending the request to %s failed: %s", container_id[:12], exc)

    @contextlib.contextmanager
    def _stdin_socket(self, container_id: str) -> Iterator[socket.socket]:
        wrapper, sock = self._attach_stdin(container_id)
        try:
            yield sock
        finally:
            close_stdin(wrapper, sock)

    def _attach_stdin(
        self, container_id: str, *, stdout: bool = False
    ) -> tuple[Any, socket.socket]:
        """A hijacked attach connection to the container's stdin (and, multiplexed, its
        stdout when ``stdout``): (docker-py wrapper, socket)."""
        params = {"stdin": 1, "stream": 1, "stdout": int(stdout)}
        wrapper = self._api.attach_socket(container_id, params=params)
        sock: socket.socket = getattr(wrapper, "_sock", wrapper)
        sock.settimeout(SEND_TIMEOUT_S)
        return wrapper, sock

    def _wait(self, container_id: str, timeout_s: float) -> bool:
        """Wait for the container to exit; kill it past the deadline. True if we killed it."""
        try:
            self._api.wait(container_id, timeout=timeout_s + self.kill_grace_s)
            return False
        except requests.exceptions.RequestException:
            pass  # read timeout on the wait call: the runner missed its own deadline
        log.warning("sandbox %s outlived its deadline; killing it", container_id[:12])
        with contextlib.suppress(docker.errors.APIError):
            self._api.kill(container_id)
        self._api.wait(container_id, timeout=API_TIMEOUT_S)
        return True

    def _logs(self, container_id: str, *, stdout: bool) -> bytes:
        return self._api.logs(container_id, stdout=stdout, stderr=not stdout, stream=False)

    def _outcome(
        self,
        container_id: str,
        frame: dict[str, Any] | None,
        state: dict[str, Any],
        watchdog_fired: bool,
        wall_ms: int,
    ) -> RunOutcome:
        if frame is not None:
            oom = bool(state.get("OOMKilled"))
            return frame_outcome(frame, container_id[:12], self.runtime, watchdog_fired, oom)
        exit_code = state.get("ExitCode")
        # No frame: the runner itself died. Killed by us (timeout) or by the OOM killer are
        # the program's doing; anything else is a broken sandbox.
        oom = bool(state.get("OOMKilled")) or (exit_code == EXIT_SIGKILL and not watchdog_fired)
        if not (watchdog_fired or oom):
            tail = self._logs(container_id, stdout=False)[-STDERR_TAIL_BYTES:]
            raise SandboxError(
                f"the sandbox runner exited {exit_code} without a result: "
                f"{tail.decode('utf-8', 'replace').strip() or 'no output'}"
            )
        return killed_outcome(container_id[:12], self.runtime, watchdog_fired, oom, wall_ms)

    def _retire(self, container_id: str, exit_wait_s: float = RETIRE_EXIT_WAIT_S) -> None:
        """Remove a container whose runner is done or whose stdin was closed (the runner then
        exits on its own): wait up to ``exit_wait_s`` for that exit first. Force-removing a
        container that is still running makes the engine kill it, which costs one more runc
        call and a killed teardown: 3-33 (median 9) of the ~185-215 CPU-ms a lifecycle costs
        here (``benchmarks/engine_capacity.py``, variants current vs exited)."""
        with contextlib.suppress(
            docker.errors.DockerException, requests.exceptions.RequestException
        ):
            self._api.wait(container_id, timeout=exit_wait_s)
        self._remove(container_id)

    def _abandon(self, container_id: str, started_ok: bool) -> None:
        """Remove a container that is done with or failed; after a failed start, also end
        the runtime processes it may have left (``end_orphaned_runtime_processes``)."""
        self._remove(container_id)
        if not started_ok:
            end_orphaned_runtime_processes(container_id)

    def _remove(self, container_id: str) -> None:
        """Remove the container; retried once, then left to ``reap()`` via its labels."""
        for attempt in (1, 2):
            try:
                self._api.remove_container(container_id, force=True)
                return
            except docker.errors.NotFound:
                return
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                if attempt == 2:
                    log.warning("could not remove sandbox %s: %s", container_id[:12], exc)
                time.sleep(0.2)


def close_stdin(wrapper: Any, sock: socket.socket) -> None:
    """Close an attach connection from ``DockerSandbox._attach_stdin``; never raises."""
    with contextlib.suppress(OSError):
        wrapper.close()
    with contextlib.suppress(OSError):
        sock.close()


def _workspace_mounts(spec: RunSpec | None) -> list[Mount]:
    """The tenant workspace bind mount, if any. Private propagation: nothing mounted later
    on the host side appears inside. The directory is the tenant's own (its parent, the
    workspace root, is never mounted), so the program cannot reach another tenant."""
    if spec is None or spec.workspace is None:
        return []
    source, mode = spec.workspace
    if not os.path.isabs(source) or not os.path.isdir(source):
        raise SandboxError(f"workspace {source} is not an existing absolute directory")
    return [
        Mount(
            target=WORKSPACE_MOUNT,
            source=str(source),
            type="bind",
            read_only=mode == "ro",
            propagation="rprivate",
        )
    ]
