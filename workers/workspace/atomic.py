"""Mutations of a workspace directory through its descriptor: atomic replace, rename that
never replaces, and fd-based recursive removal. All are ``*at`` calls on a parent
descriptor the caller resolved with ``workspace_walk``, so none follows a symlink in its
last component.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Callable

from producer.errors import Conflict
from workers.workspace.entries import check_regular
from workers.workspace.paths import TMP_PREFIX
from workers.workspace.walk import DIR_FLAGS, lstat_at

_RENAME_NOREPLACE = 1


def _libc_renameat2() -> Callable[..., int] | None:
    # Python has no renameat2 binding; glibc exports it (2.28+).
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def replace_file(
    dfd: int, name: str, data: bytes, shown: str, field: str, chown: Callable[[int], None]
) -> None:
    """Atomic replace: temp file in the same directory, fsync, renameat, fsync dir.
    ``chown(fd)`` hands the new file to the workspace owner before it becomes visible."""
    st = lstat_at(dfd, name)  # again, under the final parent descriptor
    if st is not None:
        check_regular(st, shown, field)
    tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o640, dir_fd=dfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            chown(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    os.fsync(dfd)  # the rename itself survives a crash


def rename_noreplace(sfd: int, sname: str, dfd: int, dname: str, dshown: str) -> None:
    """Rename ``sname`` in ``sfd`` to ``dname`` in ``dfd``; ``Conflict`` if it exists."""
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


def remove_tree(dfd: int, name: str) -> tuple[int, int]:
    """Delete directory ``name`` in ``dfd`` recursively, fd-based; (files, dirs) removed."""
    files = dirs = 0
    top = os.open(name, DIR_FLAGS, dir_fd=dfd)
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
