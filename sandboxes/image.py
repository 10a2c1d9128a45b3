"""Build the sandbox image without a registry.

Two layers, both cached in the local Docker engine:

1. ``actionfleet-base:bookworm`` — a Debian bookworm ``minbase`` root filesystem with python3
   (and bash, which minbase has), made by ``debootstrap`` from ``settings.debian_mirror`` in a
   temporary directory and imported with ``docker import``. Built once (~40 s).
2. ``actionfleet-sandbox:<version>`` — the base plus the runner (``image/runner.py`` and its
   modules) and an unprivileged user ``sandbox`` (uid/gid 10001), built by the legacy builder with
   ``network_mode="none"`` (the engine has no bridge; nothing in the recipe needs a network).
   ``<version>`` is a short hash of the recipe and the runner, so changing either gives a new
   tag and an unchanged one is never rebuilt.

``ACTIONFLEET_SANDBOX_IMAGE`` (``settings.sandbox_image``) overrides the tag entirely.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors

from producer.errors import SandboxError
from sandboxes.config import sandbox_settings

__all__ = [
    "BASE_IMAGE",
    "RECIPE_DIR",
    "SANDBOX_REPO",
    "base_image_tag",
    "build_base_image",
    "build_image",
    "ensure_image",
    "image_tag",
    "image_version",
]

Progress = Callable[[str], None]

SUITE = "bookworm"
BASE_IMAGE = f"actionfleet-base:{SUITE}"
SANDBOX_REPO = "actionfleet-sandbox"
RECIPE_DIR = Path(__file__).with_name("image")
# Everything that goes into the build context: the recipe, the runner's script and modules.
RECIPE_FILES = (
    "Dockerfile",
    "runner.py",
    "_runner_main.py",
    "_runner_program.py",
    "_runner_supervise.py",
)
DEBOOTSTRAP_TIMEOUT_S = 1800
TAR_CHUNK = 1 << 20
NOISY_PREFIXES = tuple(
    f"I: {verb}" for verb in ("Retrieving", "Validating", "Extracting", "Unpacking", "Configuring")
)


def _noop(_: str) -> None:
    pass


def base_image_tag() -> str:
    return BASE_IMAGE


def image_version() -> str:
    """Short content hash of the recipe and the runner (and the base they build on)."""
    digest = hashlib.sha256(BASE_IMAGE.encode())
    for name in RECIPE_FILES:
        data = (RECIPE_DIR / name).read_bytes()
        digest.update(f"\0{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:12]


def image_tag() -> str:
    """The sandbox image to run: the settings override, else the recipe's content tag."""
    override = sandbox_settings().sandbox_image
    return override or f"{SANDBOX_REPO}:{image_version()}"


def _has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


# --------------------------------------------------------------------------- base image


def _mounts_under(root: Path) -> list[str]:
    """Mount points inside ``root`` (debootstrap mounts /proc and /sys and may leave them)."""
    prefix = str(root.resolve()) + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(target)
    return sorted(found, key=len, reverse=True)  # deepest first


def _remove_rootfs(root: Path) -> None:
    """Delete a debootstrap tree, never following a mount into the host's /proc, /sys or /dev."""
    for target in _mounts_under(root):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)
    if _mounts_under(root):
        raise SandboxError(f"refusing to delete {root}: mounts are still active inside it")
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _rootfs_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="actionfleet-rootfs-"))
    try:
        yield root
    finally:
        _remove_rootfs(root)


def _debootstrap(root: Path, mirror: str, progress: Progress) -> None:
    cmd = ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(root), mirror]
    progress(f"debootstrap {SUITE} from {mirror} into {root}")
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except FileNotFoundError:
        raise SandboxError("debootstrap is not installed (apt-get install debootstrap)") from None
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-19:], line]
        if line.startswith(NOISY_PREFIXES):
            continue  # hundreds of these; the stage lines are enough
        progress(line)
    if proc.wait(timeout=DEBOOTSTRAP_TIMEOUT_S) != 0:
        raise SandboxError(f"debootstrap failed ({proc.returncode}):\n" + "\n".join(tail))


def _trim_rootfs(root: Path) -> None:
    """Drop what a sandbox never needs: downloaded .debs, apt lists, docs."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info"):
        shutil.rmtree(root / sub, ignore_errors=True)


def _tar_stream(root: Path) -> Iterator[bytes]:
    """``tar -C root -c .`` as chunks, so a 250 MB rootfs is never held in memory."""
    proc = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(TAR_CHUNK):
            yield chunk
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise SandboxError(f"tar of {root} failed ({proc.returncode})")


def build_base_image(
    client: docker.DockerClient, *, force: bool = False, progress: Progress = _noop
) -> str:
    """``actionfleet-base:bookworm`` from debootstrap; skipped when the engine has it."""
    if not force and _has_image(client, BASE_IMAGE):
        progress(f"{BASE_IMAGE} present")
        return BASE_IMAGE
    started = time.monotonic()
    repo, tag = BASE_IMAGE.split(":")
    with _rootfs_dir() as root:
        _debootstrap(root, sandbox_settings().debian_mirror, progress)
        _trim_rootfs(root)
        progress(f"importing {root} as {BASE_IMAGE}")
        client.api.import_image_from_stream(_tar_stream(root), repository=repo, tag=tag)
    if not _has_image(client, BASE_IMAGE):
        raise SandboxError(f"docker import did not produce {BASE_IMAGE}")
    progress(f"{BASE_IMAGE} built in {time.monotonic() - started:.1f}s")
    return BASE_IMAGE


# --------------------------------------------------------------------------- sandbox image


def _build_context() -> io.BytesIO:
    """A tar of exactly the recipe files, with fixed metadata (reproducible context)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in RECIPE_FILES:
            data = (RECIPE_DIR / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _docker_build(client: docker.DockerClient, tag: str, progress: Progress) -> None:
    stream = client.api.build(
        fileobj=_build_context(),
        custom_context=True,
        tag=tag,
        network_mode="none",
        rm=True,
        forcerm=True,
        pull=False,
        decode=True,
        labels={"actionfleet.image": "sandbox", "actionfleet.version": tag.split(":")[-1]},
    )
    for event in stream:
        if "error" in event:
            raise SandboxError(f"building {tag} failed: {event['error'].strip()}")
        text = str(event.get("stream", "")).strip()
        if text:
            progress(text)


def _prune_old_versions(client: docker.DockerClient, *, keep: str, progress: Progress) -> None:
    """Drop sandbox images of earlier recipes; one still used by a container stays."""
    for image in client.images.list(name=SANDBOX_REPO):
        if keep in image.tags:
            continue
        for old in image.tags:
            try:
                client.images.remove(old, noprune=False)
                progress(f"removed old {old}")
            except docker.errors.APIError:
                pass  # in use by a container (e.g. a running sandbox): next build's job


def build_image(*, force: bool = False, progress: Progress | None = None) -> str:
    """Build (or find) the base and sandbox images; returns the sandbox image tag.

    ``force`` rebuilds both layers. With ``settings.sandbox_image`` set, that tag is returned
    as-is when present (it is someone else's build), else this recipe is built under it.
    """
    say = progress or _noop
    tag = image_tag()
    client = _client()
    try:
        if not force and _has_image(client, tag):
            say(f"{tag} present")
            return tag
        build_base_image(client, force=force, progress=say)
        started = time.monotonic()
        say(f"building {tag}")
        _docker_build(client, tag, say)
        if not _has_image(client, tag):
            raise SandboxError(f"docker build did not produce {tag}")
        say(f"{tag} built in {time.monotonic() - started:.1f}s")
        if not sandbox_settings().sandbox_image:
            _prune_old_versions(client, keep=tag, progress=say)
        return tag
    except docker.errors.DockerException as exc:
        raise SandboxError(f"building the sandbox image failed: {exc}") from exc
    finally:
        client.close()


def ensure_image(progress: Progress | None = None) -> str:
    """The sandbox image tag, building it only when the engine does not have it yet."""
    return build_image(force=False, progress=progress)


def _client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise SandboxError(f"no Docker engine answers: {exc}") from exc
    return client
