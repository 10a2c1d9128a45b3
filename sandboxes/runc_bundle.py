"""The runc backend's container template: the OCI config the Docker engine generates for a
sandbox container, and the sandbox image's files, made once per image.

Why from the engine: the config is then exactly what the Docker backend runs (Docker's
default seccomp profile, no capabilities, masked and read-only /proc paths, namespaces,
rlimits, tmpfs mounts, uid 10001, no_new_privileges) without ActionFleet keeping its own
copy of any of it. It is taken from one started sandbox container, then the engine-side
parts are dropped: the prestart hook (dockerd's network set-up), the bind mounts of the
engine's per-container files (/etc/hosts, /etc/hostname, /etc/resolv.conf: the image's own
are used) and the engine's cgroup path. The root becomes a read-only copy of the image's
files, shared by every container of the image (runc mounts it read-only in each one).

Seccomp: runc would compile the profile (~360 syscalls) with libseccomp for every container,
~15 of its ~85 CPU-ms. The template instead holds the program the engine's runc compiled for
that same container (read from its runner with ``PTRACE_SECCOMP_GET_FILTER``), as
``/opt/actionfleet/seccomp.bpf`` in the root, and its config runs the runner with
``--seccomp-filter``: the runner installs it before it forks the program's process or reads
the request, and refuses to go on without it. The profile leaves the config then.

Layout under ``<dir>/images/<image id>/``: ``rootfs/``, ``config.json`` and ``.in-use``. It
is built in a temporary directory and renamed into place, so concurrent workers never see half
of one.

Pruning (``prune_templates``, run by the backend's reaper): a template whose image the engine
no longer has (an earlier sandbox recipe, or a removed image) is deleted, unless a process
still uses it. Every process that loaded a template holds a shared ``flock`` on its
``.in-use`` until it closes the backend or dies, so an old worker still running its image
during a rolling upgrade keeps its template; the pruner takes the lock exclusively (without
waiting) and renames the template away before deleting it, and a loader that raced it sees
the rename and builds the template again.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.errors import SandboxError
from sandboxes.base import WORKSPACE_MOUNT, Limits, RunSpec, WorkspaceMode
from sandboxes.seccomp_filter import read_filters

__all__ = ["Template", "prepare_template", "prune_templates", "template_dir"]

log = logging.getLogger(__name__)

# Where the engine's containerd keeps each running task's bundle (dockerd's own containerd,
# then a system containerd).
ENGINE_STATE = (
    Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby"),
    Path("/run/containerd/io.containerd.runtime.v2.task/moby"),
)
TMPFS_MOUNTS = ("/tmp", "/work")
CPU_PERIOD_US = 100_000
IN_USE = ".in-use"
# In the template's root, next to the runner: the engine's compiled seccomp program.
SECCOMP_PROGRAM = "/opt/actionfleet/seccomp.bpf"
# A half-built template older than this is a build that died (a build takes seconds).
BUILD_STALE_S = 3600.0
LOAD_TRIES = 3


@dataclass(frozen=True, slots=True)
class Template:
    """The OCI config of a sandbox of one image (its read-only root is the image's files),
    to be specialised per container."""

    config: dict[str, Any]
    # The shared lock on the template's ``.in-use``, held while this process uses it.
    lock_fd: int = -1

    def release(self) -> None:
        """Let the pruner delete this template (once no other process holds it)."""
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)

    def config_for(
        self,
        limits: Limits,
        cgroup: str,
        annotations: dict[str, str],
        workspace: tuple[Path, WorkspaceMode] | None = None,
    ) -> dict[str, Any]:
        """The config of one container: ``limits`` applied (memory without swap, CPU
        quota, pids, tmpfs sizes), its own cgroup, its labels as annotations and the
        tenant workspace bind-mounted (private propagation) when given."""
        config = copy.deepcopy(self.config)
        resources = config["linux"].setdefault("resources", {})
        memory = limits.memory_mb * 1024 * 1024
        resources.setdefault("memory", {}).update({"limit": memory, "swap": memory})
        resources.setdefault("cpu", {}).update(
            {"quota": int(limits.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
        )
        resources["pids"] = {"limit": limits.pids}
        for mount in config["mounts"]:
            if mount["destination"] in TMPFS_MOUNTS:
                mount["options"] = [o for o in mount["options"] if not o.startswith("size=")] + [
                    f"size={limits.tmpfs_mb}m"
                ]
        if workspace is not None:
            source, mode = workspace
            if not source.is_absolute() or not source.is_dir():
                raise SandboxError(f"workspace {source} is not an existing absolute directory")
            config["mounts"].append(
                {
                    "destination": WORKSPACE_MOUNT,
                    "type": "bind",
                    "source": str(source),
                    "options": ["rbind", "rprivate", "ro" if mode == "ro" else "rw"],
                }
            )
        config["linux"]["cgroupsPath"] = cgroup
        config["annotations"] = dict(annotations)
        return config


def prepare_template(image: str, directory: Path) -> Template:
    """The template of ``image`` (a tag the Docker engine has), made on first use."""
    import docker
    import docker.errors

    try:
        client = docker.from_env(timeout=120)
        home = template_dir(directory, client.images.get(image).id)
    except docker.errors.DockerException as exc:
        raise SandboxError(f"the runc backend reads image {image} from the engine: {exc}") from exc
    try:
        for _ in range(LOAD_TRIES):
            if not (home / "config.json").exists():
                _build(client, image, home)
            lock = _hold(home)
            if lock is not None:
                break
        else:
            raise SandboxError(f"the runc template {home} was pruned while loading it, thrice")
    finally:
        client.close()
    try:
        return Template(json.loads((home / "config.json").read_text()), lock)
    except (OSError, ValueError) as exc:
        os.close(lock)
        raise SandboxError(f"the runc template {home} is unreadable: {exc}") from exc


def template_dir(directory: Path, image_id: str) -> Path:
    """Where the template of the engine's image ``image_id`` lives under ``directory``."""
    return directory.resolve() / "images" / image_id.removeprefix("sha256:")[:16]


def _open_in_use(home: Path) -> int:
    return os.open(home / IN_USE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _hold(home: Path) -> int | None:
    """A shared lock on the template at ``home``; None when it was pruned meanwhile."""
    try:
        fd = _open_in_use(home)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a pruner is renaming it away
    try:
        if os.stat(home / IN_USE).st_ino == os.fstat(fd).st_ino:
            return fd
    except FileNotFoundError:
        pass
    os.close(fd)
    return None


def prune_templates(directory: Path, engine_image_ids: set[str]) -> int:
    """Delete the templates under ``directory`` of images not among ``engine_image_ids``
    that no process holds and no bundle's root is in, and half-built ones older than
    ``BUILD_STALE_S``. Returns how many templates went."""
    images = directory.resolve() / "images"
    try:
        entries = list(images.iterdir())
    except FileNotFoundError:
        return 0
    keep = {template_dir(directory, image_id).name for image_id in engine_image_ids}
    now, removed, rooted = time.time(), 0, None
    for entry in entries:
        if entry.name.startswith(".trash-"):  # a prune that died half-way
            shutil.rmtree(entry, ignore_errors=True)
            continue
        if entry.name.startswith(".tmp-"):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > BUILD_STALE_S:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        if entry.name in keep:
            continue
        if rooted is None:  # read the bundles only when there is a template to prune
            rooted = _bundle_roots(directory)
        if str(entry / "rootfs") in rooted:
            continue
        try:
            fd = _open_in_use(entry)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            trash = images / f".trash-{secrets.token_hex(6)}"
            entry.rename(trash)
        except OSError:  # held (BlockingIOError) or gone: not ours to delete
            continue
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        removed += 1
    return removed


def _bundle_roots(directory: Path) -> set[str]:
    """The root paths the container bundles under ``directory`` run on."""
    roots = set()
    with contextlib.suppress(FileNotFoundError):
        for bundle in (directory.resolve() / "bundles").iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                roots.add(json.loads((bundle / "config.json").read_text())["root"]["path"])
    return roots


def _build(client: Any, image: str, home: Path) -> None:
    import docker.errors

    from sandboxes.docker import DockerSandbox

    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = home.parent / f".tmp-{secrets.token_hex(6)}"
    (tmp / "rootfs").mkdir(parents=True)
    sandbox = DockerSandbox(runtime="runc", image=image, client=client)
    cid = ""
    try:
        # Default limits: every container replaces them with its own.
        spec = RunSpec(language="python", source="", limits=Limits())
        cid = sandbox._create(spec, sandbox._labels(spec))
        # The runner now waits on its open stdin, so the container stays up while we look.
        client.api.start(cid)
        config = _template_config(_engine_config(cid), home / "rootfs")
        seccomp = _engine_seccomp(client, cid, config)
        _export(client, cid, tmp / "rootfs")
        if seccomp is not None:
            _hand_seccomp_to_runner(config, seccomp, tmp / "rootfs")
        (tmp / "config.json").write_text(json.dumps(config))
        try:
            tmp.rename(home)
        except OSError:
            if not (home / "config.json").exists():
                raise
            # Another worker made it first: theirs is the same image's.
    except (docker.errors.DockerException, OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"could not make the runc template of {image}: {exc}") from exc
    finally:
        if cid:
            sandbox._remove(cid)
        shutil.rmtree(tmp, ignore_errors=True)


def _engine_config(cid: str) -> dict[str, Any]:
    """The OCI config the local engine generated for running container ``cid``."""
    for state in ENGINE_STATE:
        path = state / cid / "config.json"
        with contextlib.suppress(FileNotFoundError):
            return json.loads(path.read_text())
    raise SandboxError(
        "the runc backend takes its OCI config from the local Docker engine's containerd "
        f"state ({', '.join(map(str, ENGINE_STATE))}), and found none for {cid[:12]}: "
        "run the worker on the engine's host, as root"
    )


def _engine_seccomp(client: Any, cid: str, config: dict[str, Any]) -> bytes | None:
    """The seccomp program the engine's runc compiled for running container ``cid`` (read
    from its runner), or None when the config has no profile or the program cannot be
    read: the profile then stays in the config and runc compiles it per container."""
    if "seccomp" not in config["linux"]:
        return None
    pid = int(client.api.inspect_container(cid)["State"]["Pid"])
    try:
        filters = read_filters(pid)
    except OSError as exc:
        log.warning("runc will compile seccomp per container: reading the engine's: %s", exc)
        return None
    if len(filters) != 1:
        log.warning("runc will compile seccomp per container: %d filters seen", len(filters))
        return None
    return filters[0]


def _hand_seccomp_to_runner(config: dict[str, Any], program: bytes, rootfs: Path) -> None:
    """Have the runner install ``program`` (written into the template's root) itself,
    instead of runc compiling the profile again for every container (~15 CPU-ms each)."""
    target = rootfs / SECCOMP_PROGRAM.lstrip("/")
    target.write_bytes(program)
    target.chmod(0o444)
    del config["linux"]["seccomp"]
    config["process"]["args"] = [*config["process"]["args"], "--seccomp-filter", SECCOMP_PROGRAM]


def _export(client: Any, cid: str, rootfs: Path) -> None:
    """The container's files (the image's) into ``rootfs``, owners and modes kept."""
    # tar's messages go to a file: a pipe nobody reads while we write could fill and stall it.
    with tempfile.TemporaryFile() as err:
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-xf", "-"],
            stdin=subprocess.PIPE,
            stderr=err,
        )
        assert tar.stdin is not None
        try:
            for chunk in client.api.export(cid):
                tar.stdin.write(chunk)
        finally:
            tar.stdin.close()
        if tar.wait():
            err.seek(0)
            message = err.read().decode("utf-8", "replace")[-500:]
            raise SandboxError(f"unpacking the sandbox image failed: {message}")


def _template_config(config: dict[str, Any], rootfs: Path) -> dict[str, Any]:
    """The engine's config of a sandbox without its engine-side parts, rooted at ``rootfs``
    (read-only)."""
    config = dict(config)
    config["root"] = {"path": str(rootfs), "readonly": True}
    config.pop("hooks", None)
    config["mounts"] = [m for m in config["mounts"] if not m["destination"].startswith("/etc/")]
    config["process"]["terminal"] = False
    config["linux"].pop("cgroupsPath", None)
    config.pop("annotations", None)
    return config
