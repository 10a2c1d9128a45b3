"""The tenant workspace: a directory per tenant that nothing can escape.

Layout: ``<root>/<tenant>/`` holds the tenant's files (the same directory is bind-mounted at
``/workspace`` into code containers); ``<root>/.locks/<tenant>.lock`` serializes quota
checks. Tenant directory names cannot start with ``.`` (tenant ids start with a letter or
digit), so the lock directory can never collide with a tenant.

How escapes are prevented (``openat``-style resolution, emulating ``openat2(RESOLVE_BENEATH
| RESOLVE_NO_SYMLINKS)``):

1. The path is checked as text first: relative, no ``..``, no NUL or control characters,
   each component at most 255 bytes, the whole at most 4096 bytes.
2. The tenant directory is opened once, ``O_DIRECTORY | O_NOFOLLOW``, relative to the root.
3. Every further component is opened relative to the previous directory's file descriptor
   with ``O_DIRECTORY | O_NOFOLLOW`` (``os.open(name, flags, dir_fd=parent)``). A symlink
   anywhere fails with ``ELOOP`` and is refused; there is no path string that the kernel
   re-resolves later, so a symlink swapped in after a component was opened cannot redirect
   the operation: the operation uses the descriptor it already holds.
4. The last component is opened with ``O_NOFOLLOW`` (``O_NONBLOCK`` too, so a FIFO cannot
   hang the worker) and checked with ``fstat`` on the descriptor, not ``stat`` on a name:
   only regular files with one link are read or replaced. Mutations are ``*at`` calls on
   the parent descriptor (``unlinkat``, ``mkdirat``, ``renameat2``), which never follow a
   symlink in their last component.

Quotas are checked under an exclusive ``flock`` on the tenant's lock file, before anything
is written, against usage measured by walking the tenant tree (so files written by code
actions count too). ``flock`` serializes workers of one host, and of several hosts only
where the shared volume implements ``flock`` across clients (NFSv4 does, many do not);
see docs/files.md.

This module holds the public API (``Workspaces``, ``TenantWorkspace``) and its operations;
the parts live in:

- ``workers.workspace.paths``: the text checks of step 1;
- ``workers.workspace.walk``: the descriptor walk of steps 2-4;
- ``workers.workspace.entries``: entry types and the refusals for wrong kinds of entries;
- ``workers.workspace.quota``: ``Quota``, the per-tenant lock and measured usage;
- ``workers.workspace.atomic``: atomic replace, no-replace rename, fd-based tree removal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from producer.errors import Conflict, NotFound, QuotaExceeded
from sandboxes.base import SANDBOX_UID
from workers.workspace.atomic import remove_tree, rename_noreplace, replace_file
from workers.workspace.entries import FileData, check_regular, iso, type_of
from workers.workspace.paths import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    TMP_PREFIX,
    bad_path,
    show,
    split_path,
    tenant_dirname,
)
from workers.workspace.quota import LOCK_DIR, Quota, check_quota, measure_usage, tenant_lock
from workers.workspace.walk import (
    DIR_FLAGS,
    descend,
    lstat_at,
    missing_dirs,
    open_file,
    read_bounded,
)

__all__ = [
    "LOCK_DIR",
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "TMP_PREFIX",
    "FileData",
    "Quota",
    "TenantWorkspace",
    "Workspaces",
    "split_path",
    "tenant_dirname",
]


class Workspaces:
    """The root of all tenant workspaces. Cheap to build; holds no descriptors.

    ``owner_uid``/``owner_gid``: when the worker runs as root, everything it creates is
    chowned to them (the sandbox user, 10001), so that code containers mounting the
    workspace read-write can change files the files primitive wrote, and vice versa.
    """

    def __init__(
        self, root: Path, *, owner_uid: int = SANDBOX_UID, owner_gid: int = SANDBOX_UID
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.owner = (owner_uid, owner_gid) if os.geteuid() == 0 else None

    def tenant_dir(self, tenant_id: str) -> Path:
        """The tenant's directory, created if missing (for bind mounts into containers)."""
        with self.tenant(tenant_id).root_fd():
            pass
        return self.root / tenant_dirname(tenant_id)

    def tenant(self, tenant_id: str) -> TenantWorkspace:
        return TenantWorkspace(self, tenant_id)

    def _open_root(self) -> int:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(self.root, DIR_FLAGS)

    def chown(self, fd: int) -> None:
        if self.owner is not None:
            os.fchown(fd, *self.owner)


class TenantWorkspace:
    """One tenant's files. Every method resolves paths with the fd walk described in the
    module docstring and raises ``ActionError`` subclasses with field/reason/fix details.

    ``field`` names the payload field a path came from, for error messages (e.g. email
    attachments pass ``payload.attachments[2]``). ``before_final`` is a test-only seam
    called between resolving a path's parent directory and operating on its last
    component, where a symlink swap would have to happen.
    """

    def __init__(self, workspaces: Workspaces, tenant_id: str) -> None:
        self.ws = workspaces
        self.tenant_id = tenant_id
        self.dirname = tenant_dirname(tenant_id)
        self.before_final: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ resolution

    @contextlib.contextmanager
    def root_fd(self) -> Iterator[int]:
        """A descriptor of the tenant directory, created (and chowned) if missing."""
        root = self.ws._open_root()
        try:
            try:
                os.mkdir(self.dirname, 0o750, dir_fd=root)
                created = True
            except FileExistsError:
                created = False
            fd = os.open(self.dirname, DIR_FLAGS, dir_fd=root)
        finally:
            os.close(root)
        try:
            if created:
                self.ws.chown(fd)
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _parent(
        self, parts: list[str], field: str, *, create: bool = False
    ) -> Iterator[tuple[int, str]]:
        """(descriptor of the parent directory, last name). ``create``: make missing
        parent directories (each one is created with mkdirat, then opened O_NOFOLLOW)."""
        if not parts:
            raise bad_path(
                field, "the workspace root itself cannot be used here", "name a file in it"
            )
        with self.root_fd() as root:
            fd = descend(root, parts[:-1], field, create=create, chown_at=self._chown_at)
            try:
                if self.before_final is not None:
                    self.before_final(show(parts))
                yield fd, parts[-1]
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _dir(self, parts: list[str], field: str) -> Iterator[int]:
        """A descriptor of the directory at ``parts`` (the root for [])."""
        with self.root_fd() as root:
            fd = descend(root, parts, field)
            try:
                yield fd
            finally:
                os.close(fd)

    def _chown_at(self, dir_fd: int, name: str) -> None:
        if self.ws.owner is not None:
            os.chown(name, *self.ws.owner, dir_fd=dir_fd, follow_symlinks=False)

    # ------------------------------------------------------------------ quota

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return tenant_lock(self.ws._open_root, self.dirname)

    def usage(self) -> tuple[int, int]:
        """(bytes of regular files, number of entries) in the tenant's workspace."""
        with self.root_fd() as root:
            return measure_usage(root)

    def _check_quota(
        self, quota: Quota, field: str, *, add_bytes: int = 0, add_entries: int = 0
    ) -> None:
        check_quota(self.usage(), quota, field, add_bytes=add_bytes, add_entries=add_entries)

    def _missing_dirs(self, parts: list[str], field: str) -> int:
        with self.root_fd() as root:
            return missing_dirs(root, parts, field)

    # ------------------------------------------------------------------ operations

    def read(self, path: str, max_bytes: int, field: str = "payload.path") -> FileData:
        parts = split_path(path, field)
        shown = show(parts)
        with self._parent(parts, field) as (dfd, name):
            fd = open_file(dfd, name, shown, field)
            try:
                st = os.fstat(fd)
                check_regular(st, shown, field)
                if st.st_size > max_bytes:
                    raise QuotaExceeded(
                        f"{shown!r} is {st.st_size} bytes; a read returns at most {max_bytes}",
                        field=field,
                        size=st.st_size,
                        limit=max_bytes,
                    )
                data = read_bounded(fd, max_bytes)
            finally:
                os.close(fd)
        return FileData(shown, data, hashlib.sha256(data).hexdigest(), iso(st.st_mtime))

    def write(
        self, path: str, data: bytes, quota: Quota, field: str = "payload.path"
    ) -> dict[str, Any]:
        """Atomic replace: temp file in the same directory, fsync, renameat, fsync dir."""
        parts = split_path(path, field)
        shown = show(parts)
        if len(data) > quota.max_file_bytes:
            raise QuotaExceeded(
                f"the content is {len(data)} bytes, above the tenant's limit of "
                f"{quota.max_file_bytes} bytes per file; write smaller files",
                field="payload.content",
                size=len(data),
                limit=quota.max_file_bytes,
            )
        with self._locked():
            missing = self._missing_dirs(parts, field)
            old = self._existing_for_write(parts, field) if missing == 0 else None
            old_size = old.st_size if old is not None else 0
            self._check_quota(
                quota,
                field,
                add_bytes=len(data) - old_size,
                add_entries=missing + (0 if old is not None else 1),
            )
            with self._parent(parts, field, create=True) as (dfd, name):
                replace_file(dfd, name, data, shown, field, self.ws.chown)
        return {
            "path": shown,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created": old is None,
        }

    def _existing_for_write(self, parts: list[str], field: str) -> os.stat_result | None:
        shown = show(parts)
        with self._parent(parts, field) as (dfd, name):
            st = lstat_at(dfd, name)
            if st is not None:
                check_regular(st, shown, field)
            return st

    def stat(self, path: str, field: str = "payload.path") -> dict[str, Any]:
        parts = split_path(path, field)
        if not parts:
            with self._dir(parts, field) as fd:
                st = os.fstat(fd)
        else:
            with self._parent(parts, field) as (dfd, name):
                st = lstat_at(dfd, name)
            if st is None:
                raise NotFound(
                    f"{field}: {show(parts)!r} does not exist; check the path with op 'list'",
                    field=field,
                    path=show(parts),
                )
        return {
            "path": show(parts),
            "type": type_of(st.st_mode),
            "size": st.st_size,
            "modified": iso(st.st_mtime),
            "mode": oct(stat.S_IMODE(st.st_mode)),
        }

    def list(self, path: str, limit: int, field: str = "payload.path") -> dict[str, Any]:
        parts = split_path(path, field)
        entries: list[dict[str, Any]] = []
        truncated = False
        with self._dir(parts, field) as fd, os.scandir(fd) as it:
            for entry in it:
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if len(entries) >= limit:
                    truncated = True
                    break
                st = entry.stat(follow_symlinks=False)
                entries.append(
                    {
                        "name": entry.name,
                        "type": type_of(st.st_mode),
                        "size": st.st_size,
                        "modified": iso(st.st_mtime),
                    }
                )
        entries.sort(key=lambda e: e["name"])
        return {"path": show(parts), "entries": entries, "truncated": truncated}

    def mkdir(self, path: str, quota: Quota, field: str = "payload.path") -> dict[str, Any]:
        parts = split_path(path, field)
        shown = show(parts)
        if not parts:
            return {"path": shown, "created": False}
        with self._locked():
            missing = self._missing_dirs(parts, field)
            if missing == 0:
                with self._parent(parts, field) as (dfd, name):
                    st = lstat_at(dfd, name)
                if st is not None:
                    if stat.S_ISDIR(st.st_mode):
                        return {"path": shown, "created": False}
                    raise Conflict(
                        f"{field}: {shown!r} exists and is a {type_of(st.st_mode)}, not a "
                        "directory; choose another name or delete it first",
                        field=field,
                        path=shown,
                    )
            self._check_quota(quota, field, add_entries=missing + 1)
            with self._parent(parts, field, create=True) as (dfd, name):
                try:
                    os.mkdir(name, 0o750, dir_fd=dfd)
                except FileExistsError:
                    raise Conflict(f"{field}: {shown!r} appeared meanwhile", field=field) from None
                self._chown_at(dfd, name)
        return {"path": shown, "created": True}

    def delete(self, path: str, field: str = "payload.path") -> dict[str, Any]:
        """Files, symlinks (the link itself) and directories (recursively, fd-based)."""
        parts = split_path(path, field)
        shown = show(parts)
        with self._parent(parts, field) as (dfd, name):
            st = lstat_at(dfd, name)
            if st is None:
                raise NotFound(f"{field}: {shown!r} does not exist", field=field, path=shown)
            kind = type_of(st.st_mode)
            files = dirs = 0
            if kind == "dir":
                files, dirs = remove_tree(dfd, name)
            else:
                os.unlink(name, dir_fd=dfd)
                files = 1
        return {"path": shown, "type": kind, "deleted_files": files, "deleted_dirs": dirs}

    def move(self, src: str, dest: str, quota: Quota) -> dict[str, Any]:
        """Rename within the workspace; refuses to replace anything (RENAME_NOREPLACE)."""
        sparts = split_path(src, "payload.path")
        dparts = split_path(dest, "payload.dest")
        sshown, dshown = show(sparts), show(dparts)
        if sparts == dparts[: len(sparts)]:
            raise bad_path(
                "payload.dest",
                f"cannot move {sshown!r} into itself ({dshown!r})",
                "choose a destination outside the source",
            )
        with self._locked():
            missing = self._missing_dirs(dparts, "payload.dest")
            self._check_quota(quota, "payload.dest", add_entries=missing)
            with (
                self._parent(sparts, "payload.path") as (sfd, sname),
                self._parent(dparts, "payload.dest", create=True) as (dfd, dname),
            ):
                st = lstat_at(sfd, sname)
                if st is None:
                    raise NotFound(f"payload.path: {sshown!r} does not exist", path=sshown)
                rename_noreplace(sfd, sname, dfd, dname, dshown)
        return {"path": sshown, "dest": dshown, "type": type_of(st.st_mode)}
