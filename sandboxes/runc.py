"""The runc sandbox backend: the Docker backend's containers, run by ``runc`` directly.

Same container (the engine's own OCI config for a sandbox, see ``sandboxes.runc_bundle``),
same runner and protocol, same limits; what goes is the path through dockerd, containerd
and a shim per container, which costs most of a container lifecycle's CPU here
(``benchmarks/runtime_cost.py``: the engine ~200 machine CPU-ms per lifecycle, runc ~85).

A run, step by step::

    write the container's config.json  ->  runc run --detach with the runner's stdin and
    stdout as two pipes we hold (runc passes its stdio through and exits once the runner
    runs)  ->  write the request, close stdin  ->  read the frame from the stdout pipe
    ->  wait for the runner's exit  ->  remove its cgroups and runc's state for it (what
    ``runc delete`` does for a stopped container; ``runc delete --force`` when the runner
    did not exit or anything is not as expected)

No process of ours stays between runc and the container (no shim), so this process makes
itself a child subreaper: runners re-parent to it and their exit status is collected here.

Timeouts: the runner kills the program at its deadline; if there is no frame
``kill_grace_s`` later, ``runc kill`` SIGKILLs the runner (``timed_out``). OOM: the
runner's own cgroup counter, else the container cgroup's ``oom_kill`` counter read on the
host, else a runner that died of SIGKILL we did not send (as the Docker backend decides).

Leftovers: each container's annotations carry the sandbox labels (owner ``<host>:<pid>``,
expiry), its bundle directory is ``<dir>/bundles/<id>``, and runc's state is under
``<dir>/state``; ``reap()`` deletes the containers and bundles of dead owners or past
their expiry. Needs root, ``runc`` on PATH, and the Docker engine once per image (to make
the template).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from producer.errors import SandboxError
from sandboxes.base import Limits, RunOutcome, RunSpec, Runtime, Warm, WorkspaceMode
from sandboxes.config import sandbox_settings
from sandboxes.frames import encode_request, fd_closed, frame_outcome, killed_outcome, read_frame
from sandboxes.reaper import (
    EXPIRY_SLACK_S,
    LABEL_EXPIRES,
    LABEL_OWNER,
    is_stale,
    owner_label,
    run_labels,
)
from sandboxes.runc_bundle import Template, prepare_template, prune_templates

__all__ = ["RuncSandbox"]

log = logging.getLogger(__name__)

CGROUP_PARENT = "actionfleet"
RUNC_TIMEOUT_S = 60.0
RETIRE_EXIT_WAIT_S = 5.0
STDERR_TAIL_BYTES = 2000
PR_SET_CHILD_SUBREAPER = 36
CGROUP_RMDIR_TRIES = 20


@dataclass(slots=True)
class _Container:
    id: str
    pid: int
    stdin: int  # write end of the runner's stdin
    stdout: int  # read end of the runner's stdout
    bundle: Path


class RuncSandbox:
    """``Sandbox`` (and ``WarmBackend``) running each program in a fresh container made by
    ``runc`` itself. Thread-safe; one per worker process.

    ``image``: the sandbox image tag whose files and engine config make the template (by
    default the built sandbox image). ``directory``: where the template and the per-
    container bundles live (setting ``sandbox_runc_dir``).
    """

    runtime: Runtime = "runc"

    def __init__(
        self,
        image: str | None = None,
        *,
        directory: Path | None = None,
        kill_grace_s: float = 2.0,
    ) -> None:
        runc = shutil.which("runc")
        if runc is None or os.geteuid() != 0:
            raise SandboxError(
                "the runc sandbox backend runs runc itself: it needs root and runc on PATH "
                "(or use ACTIONFLEET_SANDBOX_BACKEND=docker)"
            )
        self._image = image
        self.directory = (directory or sandbox_settings().sandbox_runc_dir).resolve()
        # runc's state: after a reboot it names dead processes, which reap() deletes.
        self._runc = [runc, "--root", str(self.directory / "state")]
        self.kill_grace_s = kill_grace_s
        self._template: Template | None = None
        self._template_lock = threading.Lock()

    @property
    def image(self) -> str:
        if self._image is None:
            from sandboxes.image import ensure_image

            self._image = ensure_image()
        return self._image

    # ------------------------------------------------------------------ Sandbox protocol

    def run(self, spec: RunSpec) -> RunOutcome:
        """Run ``spec`` in a fresh container; program failures are in the outcome."""
        labels = run_labels(spec, self.runtime, self.kill_grace_s)
        container = self._start(spec.limits, labels, spec.workspace)
        try:
            return self._finish(container, spec)
        finally:
            self._destroy(container)

    def reap(self) -> int:
        """Delete containers (and bundles) of dead owners on this host, or past expiry;
        then the templates of images the engine no longer has that no process uses."""
        return self._reap(everything=False)

    def reap_all(self) -> int:
        """Delete every container of this backend on this host, live or not; then the
        unused templates, as ``reap()``."""
        return self._reap(everything=True)

    def close(self) -> None:
        """Release the template (nothing else is held between runs)."""
        with self._template_lock:
            if self._template is not None:
                self._template.release()
                self._template = None

    # ------------------------------------------------------------------ WarmBackend

    def start_warm(self, limits: Limits, labels: dict[str, str]) -> Warm:
        container = self._start(limits, labels, None)
        return Warm(container.id, float(labels[LABEL_EXPIRES]), time.time(), container)

    def warm_alive(self, warm: Warm) -> bool:
        return not fd_closed(warm.handle.stdout)

    def run_warm(self, warm: Warm, spec: RunSpec) -> RunOutcome:
        return self._finish(warm.handle, spec)

    def retire(self, warm: Warm) -> None:
        self._destroy(warm.handle)

    def containers(self) -> list[str]:
        """Ids of this host's containers of the backend, running or not: runc's state
        directory, read directly rather than through ``runc list``, which fails as a whole
        when a container is created or deleted while it reads (other processes' pools do
        both all the time)."""
        try:
            return sorted(entry.name for entry in os.scandir(self.directory / "state"))
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ steps

    def template(self) -> Template:
        """The image's template, made on first use; this process becomes a subreaper then
        (not before: a process that only reaps, like a worker's main process, stays as is)."""
        with self._template_lock:
            if self._template is None:
                # Runners re-parent to us when runc exits: their status is ours to collect.
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                    errno = ctypes.get_errno()
                    raise SandboxError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {errno}")
                self._template = prepare_template(self.image, self.directory)
            return self._template

    def _start(
        self,
        limits: Limits,
        labels: dict[str, str],
        workspace: tuple[Path, WorkspaceMode] | None,
    ) -> _Container:
        template = self.template()
        cid = secrets.token_hex(6)
        bundle = self.directory / "bundles" / cid
        config = template.config_for(limits, f"/{CGROUP_PARENT}/{cid}", labels, workspace)
        ours: list[int] = []  # pipe ends to close if the start fails
        handed = False
        try:
            bundle.mkdir(parents=True)
            (bundle / "config.json").write_text(json.dumps(config))
            stdin_r, stdin_w = os.pipe()
            ours += [stdin_r, stdin_w]
            stdout_r, stdout_w = os.pipe()
            ours += [stdout_r, stdout_w]
            run = ["run", "--detach", "--pid-file", str(bundle / "pid"), "--bundle", str(bundle)]
            with open(bundle / "stderr", "wb") as stderr:
                started = subprocess.run(
                    [*self._runc, *run, cid],
                    stdin=stdin_r,
                    stdout=stdout_w,
                    stderr=stderr,
                    timeout=RUNC_TIMEOUT_S,
                    check=False,
                )
            if started.returncode:
                raise SandboxError(f"runc could not start a sandbox: {_tail(bundle)}")
            os.set_blocking(stdin_w, False)
            container = _Container(
                cid, int((bundle / "pid").read_text()), stdin_w, stdout_r, bundle
            )
            handed = True
            for fd in (stdin_r, stdout_w):  # the runner holds its ends now
                os.close(fd)
            return container
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            raise SandboxError(f"runc could not start a sandbox: {exc}") from exc
        finally:
            if not handed:  # failed: nothing may stay behind
                for fd in ours:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._delete(cid)
                shutil.rmtree(bundle, ignore_errors=True)

    def _finish(self, container: _Container, spec: RunSpec) -> RunOutcome:
        """Send the request, read the frame, and decide the outcome."""
        nonce = secrets.token_hex(16)
        started = time.monotonic()
        deadline = started + spec.limits.timeout_s + self.kill_grace_s
        self._send(container, encode_request(spec, nonce), started + RUNC_TIMEOUT_S)
        frame, watchdog_fired = read_frame(
            container.stdout, nonce, deadline, spec.limits, multiplexed=False
        )
        if frame is not None:
            # Final under runc (see read_frame): the exit is waited for when retiring.
            return frame_outcome(frame, container.id, self.runtime, False, False)
        if watchdog_fired:
            log.warning("sandbox %s outlived its deadline; killing it", container.id)
            self._runc_call("kill", container.id, "KILL")
        status = self._wait_exit(container, RUNC_TIMEOUT_S)
        killed = status is not None and os.WIFSIGNALED(status)
        sigkill = killed and os.WTERMSIG(status) == signal.SIGKILL  # type: ignore[arg-type]
        # No frame: killed by us (timeout) or by the OOM killer is the program's doing;
        # anything else is a broken sandbox. The cgroup's counter says which; without one,
        # a SIGKILL we did not send is taken for the OOM killer's (as the Docker backend).
        kills = self._oom_kills(container)
        oom = kills > 0 if kills is not None else sigkill and not watchdog_fired
        if not (watchdog_fired or oom):
            raise SandboxError(
                f"the sandbox runner exited ({_describe(status)}) without a result: "
                f"{_tail(container.bundle) or 'no output'}"
            )
        wall_ms = int((time.monotonic() - started) * 1000)
        return killed_outcome(container.id, self.runtime, watchdog_fired, oom, wall_ms)

    def _send(self, container: _Container, request: bytes, deadline: float) -> None:
        """Write the request and close stdin (EOF ends the request). A runner that died
        before reading it all (e.g. OOM at start) is decided from its exit, not here."""
        view = memoryview(request)
        try:
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the runner stopped reading its request")
                select.select([], [container.stdin], [], remaining)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(container.stdin, view) :]
        except OSError as exc:
            log.debug("sending the request to %s failed: %s", container.id, exc)
        finally:
            with contextlib.suppress(OSError):
                os.close(container.stdin)
            container.stdin = -1

    def _wait_exit(self, container: _Container, timeout_s: float) -> int | None:
        """The runner's wait status once it exited (None: not our child, or still running
        after ``timeout_s``). Waits on a pidfd, so there is no polling."""
        try:
            pidfd = os.pidfd_open(container.pid)
        except ProcessLookupError:
            return self._reap_status(container.pid)
        try:
            select.select([pidfd], [], [], timeout_s)
        finally:
            os.close(pidfd)
        return self._reap_status(container.pid)

    @staticmethod
    def _reap_status(pid: int) -> int | None:
        try:
            found, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None  # not re-parented to us (e.g. made by a process that died)
        return status if found else None

    def _oom_kills(self, container: _Container) -> int | None:
        """OOM kills in the container's memory cgroup (v1 ``memory.oom_control`` or v2
        ``memory.events``); None if neither is readable."""
        base = Path("/sys/fs/cgroup")
        for path in (
            base / "memory" / CGROUP_PARENT / container.id / "memory.oom_control",
            base / CGROUP_PARENT / container.id / "memory.events",
        ):
            with contextlib.suppress(OSError, ValueError):
                for line in path.read_text().splitlines():
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        return None

    def _destroy(self, container: _Container) -> None:
        """End and remove a container: wait for the runner's own exit (it exits after its
        frame, or at EOF on stdin), then remove what runc made; the bundle goes last."""
        for fd in (container.stdin, container.stdout):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        container.stdin = container.stdout = -1
        exited = self._wait_exit(container, RETIRE_EXIT_WAIT_S) is not None
        if not (exited and self._remove_stopped(container.id)):
            self._delete(container.id)
            self._reap_status(container.pid)  # if the delete had to kill it
        shutil.rmtree(container.bundle, ignore_errors=True)

    def _remove_stopped(self, cid: str) -> bool:
        """Remove a container whose runner we reaped, as ``runc delete`` does for a stopped
        one (its cgroups, then its state directory), without starting runc: ~9 of a
        container's ~100 CPU-ms. The runner was PID 1 of the container's PID namespace, so
        the kernel killed and reaped every other process of it before we could reap the
        runner. False when anything is not as expected; the caller then asks runc."""
        state = self.directory / "state" / cid
        try:
            paths = json.loads((state / "state.json").read_text())["cgroup_paths"]
            cgroups = {Path(path) for path in paths.values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        for cgroup in cgroups:
            # Only the container's own cgroups, as this backend names them.
            if cgroup.parts[:3] != ("/", "sys", "fs") or cgroup.parts[-2:] != (
                CGROUP_PARENT,
                cid,
            ):
                return False
            if not _rmdir_cgroup(cgroup):
                return False
        shutil.rmtree(state, ignore_errors=True)
        return not state.exists()

    def _delete(self, cid: str) -> None:
        """``runc delete --force``: kills what runs, removes the state and the cgroup."""
        try:
            self._runc_call("delete", "--force", cid)
        except SandboxError as exc:
            log.warning("could not delete sandbox %s: %s", cid, exc)

    def _runc_call(self, *args: str) -> None:
        try:
            done = subprocess.run(
                [*self._runc, *args], capture_output=True, timeout=RUNC_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise SandboxError(f"runc {args[0]} failed: {exc}") from exc
        if done.returncode and b"does not exist" not in done.stderr:
            raise SandboxError(f"runc {args[0]} failed: {done.stderr.decode()[-500:]}")

    # ------------------------------------------------------------------ leftovers

    def _prune_templates(self) -> None:
        """Templates follow the engine's images: one whose image is gone goes too."""
        import docker
        import docker.errors

        try:
            client = docker.from_env(timeout=30)
            try:
                images = {image.id for image in client.images.list(all=True)}
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            log.warning("runc templates not pruned: the engine's images are unknown: %s", exc)
            return
        pruned = prune_templates(self.directory, images)
        if pruned:
            log.warning("pruned %d runc templates of images the engine no longer has", pruned)

    def _reap(self, *, everything: bool) -> int:
        now, host, removed = time.time(), socket.gethostname(), 0
        bundles = self.directory / "bundles"
        listed = set(self.containers())
        for cid in listed:
            labels = _annotations(bundles / cid)
            if everything or is_stale(labels, now, host):
                pid = _pid(bundles / cid)
                self._delete(cid)
                if pid and labels.get(LABEL_OWNER) == owner_label():
                    self._reap_status(pid)  # our own runner's zombie
                shutil.rmtree(bundles / cid, ignore_errors=True)
                removed += 1
        # Bundles without a container: a start that failed half-way, or a reboot.
        with contextlib.suppress(FileNotFoundError):
            for bundle in bundles.iterdir():
                if bundle.name in listed:
                    continue
                # A fresh one may be a start in progress whose config is not written yet.
                fresh = now - bundle.stat().st_mtime < EXPIRY_SLACK_S
                if everything or (not fresh and is_stale(_annotations(bundle), now, host)):
                    shutil.rmtree(bundle, ignore_errors=True)
        self._prune_templates()  # after the containers: a dead one's template can go too
        return removed


def _rmdir_cgroup(path: Path) -> bool:
    """Remove an empty cgroup; a task that is still exiting keeps it busy for a moment."""
    for _ in range(CGROUP_RMDIR_TRIES):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
            time.sleep(0.005)
    return False


def _annotations(bundle: Path) -> dict[str, str]:
    """A bundle's sandbox labels; {} (which is stale: no expiry) when unreadable."""
    try:
        return json.loads((bundle / "config.json").read_text()).get("annotations") or {}
    except (OSError, ValueError):
        return {}


def _pid(bundle: Path) -> int | None:
    try:
        return int((bundle / "pid").read_text())
    except (OSError, ValueError):
        return None


def _tail(bundle: Path) -> str:
    try:
        with open(bundle / "stderr", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL_BYTES))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _describe(status: int | None) -> str:
    if status is None:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"
