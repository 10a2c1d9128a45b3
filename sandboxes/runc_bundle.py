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

Layout under ``<dir>/images/<image id>/``: ``rootfs/`` and ``config.json``. It is built in a
temporary directory and renamed into place, so concurrent workers never see half of one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.errors import SandboxError
from sandboxes.base import WORKSPACE_MOUNT, Limits, RunSpec, WorkspaceMode

__all__ = ["Template", "prepare_template"]

# Where the engine's containerd keeps each running task's bundle (dockerd's own containerd,
# then a system containerd).
ENGINE_STATE = (
    Path("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby"),
    Path("/run/containerd/io.containerd.runtime.v2.task/moby"),
)
TMPFS_MOUNTS = ("/tmp", "/work")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class Template:
    """The OCI config of a sandbox of one image (its read-only root is the image's files),
    to be specialised per container."""

    config: dict[str, Any]

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
        image_id = client.images.get(image).id.removeprefix("sha256:")[:16]
    except docker.errors.DockerException as exc:
        raise SandboxError(f"the runc backend reads image {image} from the engine: {exc}") from exc
    home = directory.resolve() / "images" / image_id
    try:
        if not (home / "config.json").exists():
            _build(client, image, home)
    finally:
        client.close()
    return Template(json.loads((home / "config.json").read_text()))


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
        _export(client, cid, tmp / "rootfs")
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
