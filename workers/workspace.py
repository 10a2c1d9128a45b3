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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from producer.errors import ActionError, Conflict, NotFound, QuotaExceeded
from sandboxes.base import SANDBOX_UID
from workers.paths import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    TMP_PREFIX,
    bad_path,
    show,
    split_path,
    tenant_dirname,
)

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "FileData",
    "Quota",
    "TenantWorkspace",
    "Workspaces",
    "split_path",
    "tenant_dirname",
]

LOCK_DIR = ".locks"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_RENAME_NOREPLACE = 1

EntryType = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-tenant limits on what the workspace may hold (from policy ``files``)."""

    max_file_bytes: int
    max_total_bytes: int
    max_entries: int  # files, directories and anything else, the root excluded


@dataclass(frozen=True, slots=True)
class FileData:
    path: str
    data: bytes
    sha256: str
    modified: str


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _type_of(mode: int) -> EntryType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


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
        return os.open(self.root, _DIR_FLAGS)

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
            fd = os.open(self.dirname, _DIR_FLAGS, dir_fd=root)
        finally:
            os.close(root)
        try:
            if created:
                self.ws.chown(fd)
            yield fd
        finally:
            os.close(fd)

    def _open_dir(self, parent: int, name: str, shown: str, field: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            raise NotFound(
                f"{field}: directory {shown!r} does not exist; create it with op 'mkdir' "
                "or check the path with op 'list'",
                field=field,
                path=shown,
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            # O_NOFOLLOW|O_DIRECTORY reports a symlink as ELOOP or ENOTDIR; say which.
            st = self._lstat(parent, name)
            raise self._not_a_dir(st, shown, field) from None

    def _not_a_dir(self, st: os.stat_result | None, shown: str, field: str) -> ActionError:
        kind = _type_of(st.st_mode) if st is not None else "other"
        if kind == "symlink":
            return bad_path(
                field,
                f"{shown!r} is a symbolic link; links are never followed in the workspace",
                "use the real path of the directory",
            )
        what = "a file" if kind == "file" else "a device, FIFO or socket"
        return Conflict(
            f"{field}: {shown!r} is {what}, not a directory; use another path",
            field=field,
            path=shown,
        )

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
            fd = os.dup(root)
            try:
                for i, name in enumerate(parts[:-1]):
                    shown = show(parts[: i + 1])
                    if create:
                        with contextlib.suppress(FileExistsError):
                            os.mkdir(name, 0o750, dir_fd=fd)
                            self._chown_at(fd, name)
                    nxt = self._open_dir(fd, name, shown, field)
                    os.close(fd)
                    fd = nxt
                if self.before_final is not None:
                    self.before_final(show(parts))
                yield fd, parts[-1]
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _dir(self, parts: list[str], field: str) -> Iterator[int]:
        """A descriptor of the directory at ``parts`` (the root for [])."""
        with self.root_fd() as root:
            fd = os.dup(root)
            try:
                for i, name in enumerate(parts):
                    nxt = self._open_dir(fd, name, show(parts[: i + 1]), field)
                    os.close(fd)
                    fd = nxt
                yield fd
            finally:
                os.close(fd)

    def _chown_at(self, dir_fd: int, name: str) -> None:
        if self.ws.owner is not None:
            os.chown(name, *self.ws.owner, dir_fd=dir_fd, follow_symlinks=False)

    @staticmethod
    def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ quota lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive per-tenant lock, outside the tenant dir so code cannot touch it."""
        root = self.ws._open_root()
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(LOCK_DIR, 0o700, dir_fd=root)
            locks = os.open(LOCK_DIR, _DIR_FLAGS, dir_fd=root)
        finally:
            os.close(root)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(f"{self.dirname}.lock", flags, 0o600, dir_fd=locks)
        finally:
            os.close(locks)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def usage(self) -> tuple[int, int]:
        """(bytes of regular files, number of entries) in the tenant's workspace."""
        total = entries = 0
        with self.root_fd() as root:
            # fwalk is fd-based and never follows symlinks (it re-checks each directory
            # it enters against the lstat it saw), so a code action cannot redirect it.
            for _dirpath, dirs, files, dfd in os.fwalk(".", dir_fd=root):
                entries += len(dirs)
                for name in files:
                    if name.startswith(TMP_PREFIX):
                        continue
                    entries += 1
                    st = self._lstat(dfd, name)
                    if st is not None and stat.S_ISREG(st.st_mode):
                        total += st.st_size
        return total, entries

    def _check_quota(
        self, quota: Quota, field: str, *, add_bytes: int = 0, add_entries: int = 0
    ) -> None:
        total, entries = self.usage()
        if add_bytes > 0 and total + add_bytes > quota.max_total_bytes:
            raise QuotaExceeded(
                f"the workspace holds {total} bytes and this would add {add_bytes}, above "
                f"the tenant's limit of {quota.max_total_bytes} bytes; delete files first",
                field=field,
                used=total,
                limit=quota.max_total_bytes,
            )
        if add_entries > 0 and entries + add_entries > quota.max_entries:
            raise QuotaExceeded(
                f"the workspace holds {entries} files and directories and this would add "
                f"{add_entries}, above the tenant's limit of {quota.max_entries}; "
                "delete some first",
                field=field,
                used=entries,
                limit=quota.max_entries,
            )

    def _missing_dirs(self, parts: list[str], field: str) -> int:
        """How many parent directories of ``parts`` do not exist yet (for the count quota)."""
        with self.root_fd() as root:
            fd = os.dup(root)
            try:
                for i, name in enumerate(parts[:-1]):
                    try:
                        nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except FileNotFoundError:
                        return len(parts) - 1 - i
                    except OSError:
                        nxt = self._open_dir(fd, name, show(parts[: i + 1]), field)
                    os.close(fd)
                    fd = nxt
                return 0
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ operations

    def read(self, path: str, max_bytes: int, field: str = "payload.path") -> FileData:
        parts = split_path(path, field)
        shown = show(parts)
        with self._parent(parts, field) as (dfd, name):
            fd = self._open_file(dfd, name, shown, field)
            try:
                st = os.fstat(fd)
                self._check_regular(st, shown, field)
                if st.st_size > max_bytes:
                    raise QuotaExceeded(
                        f"{shown!r} is {st.st_size} bytes; a read returns at most {max_bytes}",
                        field=field,
                        size=st.st_size,
                        limit=max_bytes,
                    )
                data = self._read_fd(fd, max_bytes)
            finally:
                os.close(fd)
        return FileData(shown, data, hashlib.sha256(data).hexdigest(), _iso(st.st_mtime))

    @staticmethod
    def _read_fd(fd: int, max_bytes: int) -> bytes:
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # grew while we read it
                raise QuotaExceeded(f"the file grew above {max_bytes} bytes while being read")
        return b"".join(chunks)

    def _open_file(self, dfd: int, name: str, shown: str, field: str) -> int:
        st = self._lstat(dfd, name)
        if st is None:
            raise NotFound(
                f"{field}: {shown!r} does not exist; check the path with op 'list'",
                field=field,
                path=shown,
            )
        # Early refusal so a device or FIFO is never even opened; the fstat after the
        # open (on the descriptor) is the check that counts.
        self._check_regular(st, shown, field)
        try:
            return os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            raise NotFound(f"{field}: {shown!r} does not exist", field=field) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refuse_type("symlink", shown, field) from None
            raise

    def _check_regular(self, st: os.stat_result, shown: str, field: str) -> None:
        kind = _type_of(st.st_mode)
        if kind != "file":
            raise self._refuse_type(kind, shown, field)
        if st.st_nlink > 1:
            raise bad_path(
                field,
                f"{shown!r} has {st.st_nlink} hard links; hard-linked files are refused",
                "copy the data to a new file instead of linking it",
            )

    @staticmethod
    def _refuse_type(kind: EntryType, shown: str, field: str) -> ActionError:
        if kind == "dir":
            return Conflict(
                f"{field}: {shown!r} is a directory; use op 'list' or name a file",
                field=field,
                path=shown,
            )
        if kind == "symlink":
            return bad_path(
                field,
                f"{shown!r} is a symbolic link; links are never followed in the workspace",
                "use the real path, or delete the link",
            )
        return bad_path(
            field,
            f"{shown!r} is a device, FIFO or socket; only regular files can be used",
            "delete it or use another path",
        )

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
                self._replace(dfd, name, data, shown, field)
        return {
            "path": shown,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "created": old is None,
        }

    def _existing_for_write(self, parts: list[str], field: str) -> os.stat_result | None:
        shown = show(parts)
        with self._parent(parts, field) as (dfd, name):
            st = self._lstat(dfd, name)
            if st is not None:
                self._check_regular(st, shown, field)
            return st

    def _replace(self, dfd: int, name: str, data: bytes, shown: str, field: str) -> None:
        st = self._lstat(dfd, name)  # again, under the final parent descriptor
        if st is not None:
            self._check_regular(st, shown, field)
        tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o640, dir_fd=dfd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                self.ws.chown(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)  # the rename itself survives a crash

    def stat(self, path: str, field: str = "payload.path") -> dict[str, Any]:
        parts = split_path(path, field)
        if not parts:
            with self._dir(parts, field) as fd:
                st = os.fstat(fd)
        else:
            with self._parent(parts, field) as (dfd, name):
                st = self._lstat(dfd, name)
            if st is None:
                raise NotFound(
                    f"{field}: {show(parts)!r} does not exist; check the path with op 'list'",
                    field=field,
                    path=show(parts),
                )
        return {
            "path": show(parts),
            "type": _type_of(st.st_mode),
            "size": st.st_size,
            "modified": _iso(st.st_mtime),
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
                        "type": _type_of(st.st_mode),
                        "size": st.st_size,
                        "modified": _iso(st.st_mtime),
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
                    st = self._lstat(dfd, name)
                if st is not None:
                    if stat.S_ISDIR(st.st_mode):
                        return {"path": shown, "created": False}
                    raise Conflict(
                        f"{field}: {shown!r} exists and is a {_type_of(st.st_mode)}, not a "
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
            st = self._lstat(dfd, name)
            if st is None:
                raise NotFound(f"{field}: {shown!r} does not exist", field=field, path=shown)
            kind = _type_of(st.st_mode)
            files = dirs = 0
            if kind == "dir":
                files, dirs = self._remove_tree(dfd, name)
            else:
                os.unlink(name, dir_fd=dfd)
                files = 1
        return {"path": shown, "type": kind, "deleted_files": files, "deleted_dirs": dirs}

    @staticmethod
    def _remove_tree(dfd: int, name: str) -> tuple[int, int]:
        files = dirs = 0
        top = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            for _p, subdirs, names, sub in os.fwalk(".", topdown=False, dir_fd=top):
                for n in names:
                    os.unlink(n, dir_fd=sub)
                    files += 1
                for d in subdirs:  # fwalk puts symlinks to directories here too
                    st = os.stat(d, dir_fd=sub, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        os.rmdir(d, dir_fd=sub)
                        dirs += 1
                    else:
                        os.unlink(d, dir_fd=sub)
                        files += 1
        finally:
            os.close(top)
        os.rmdir(name, dir_fd=dfd)
        return files, dirs + 1

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
                st = self._lstat(sfd, sname)
                if st is None:
                    raise NotFound(f"payload.path: {sshown!r} does not exist", path=sshown)
                self._rename_noreplace(sfd, sname, dfd, dname, dshown)
        return {"path": sshown, "dest": dshown, "type": _type_of(st.st_mode)}

    @staticmethod
    def _rename_noreplace(sfd: int, sname: str, dfd: int, dname: str, dshown: str) -> None:
        exists = Conflict(
            f"payload.dest: {dshown!r} already exists; delete it first or choose another name",
            field="payload.dest",
            path=dshown,
        )
        if _renameat2 is not None:
            rc = _renameat2(sfd, os.fsencode(sname), dfd, os.fsencode(dname), _RENAME_NOREPLACE)
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise exists
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(err, os.strerror(err))
        # No renameat2 here (or the filesystem lacks it): check, then rename. The quota
        # lock serializes files actions; only a code action could race this window.
        with contextlib.suppress(FileNotFoundError):
            os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            raise exists
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
