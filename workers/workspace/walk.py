"""The descriptor walk: open a workspace path component by component, never by a string.

Every directory is opened relative to the previous one's descriptor with
``O_DIRECTORY | O_NOFOLLOW`` (``openat``), so a symlink anywhere fails the open and a
directory swapped after it was opened cannot redirect the walk; the last component is opened
``O_NOFOLLOW | O_NONBLOCK`` and checked on the descriptor. See ``workers.workspace.tenant`` for the
whole scheme. Functions here take and return raw descriptors; callers own what they get.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

from producer.errors import NotFound, QuotaExceeded
from workers.workspace.entries import check_regular, not_a_dir, refuse_type
from workers.workspace.paths import show

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Called as chown_at(dir_fd, name) on a directory the walk created.
ChownAt = Callable[[int, str], None]


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir(parent: int, name: str, shown: str, field: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
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
        st = lstat_at(parent, name)
        raise not_a_dir(st, shown, field) from None


def descend(
    root: int,
    parts: list[str],
    field: str,
    *,
    create: bool = False,
    chown_at: ChownAt | None = None,
) -> int:
    """A new descriptor of the directory at ``parts`` below ``root`` (a dup of ``root`` for
    []); the caller closes it. ``create``: make missing directories on the way (each one
    with mkdirat, then opened O_NOFOLLOW like any other), passing each to ``chown_at``."""
    fd = os.dup(root)
    try:
        for i, name in enumerate(parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o750, dir_fd=fd)
                    if chown_at is not None:
                        chown_at(fd, name)
            nxt = open_dir(fd, name, show(parts[: i + 1]), field)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def missing_dirs(root: int, parts: list[str], field: str) -> int:
    """How many parent directories of ``parts`` do not exist yet (for the count quota)."""
    fd = os.dup(root)
    try:
        for i, name in enumerate(parts[:-1]):
            try:
                nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return len(parts) - 1 - i
            except OSError:
                nxt = open_dir(fd, name, show(parts[: i + 1]), field)
            os.close(fd)
            fd = nxt
        return 0
    finally:
        os.close(fd)


def open_file(dfd: int, name: str, shown: str, field: str) -> int:
    """A read-only descriptor of the regular file ``name`` in ``dfd``; the caller must still
    ``check_regular`` its ``fstat``."""
    st = lstat_at(dfd, name)
    if st is None:
        raise NotFound(
            f"{field}: {shown!r} does not exist; check the path with op 'list'",
            field=field,
            path=shown,
        )
    # Early refusal so a device or FIFO is never even opened; the fstat after the
    # open (on the descriptor) is the check that counts.
    check_regular(st, shown, field)
    try:
        return os.open(name, FILE_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        raise NotFound(f"{field}: {shown!r} does not exist", field=field) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse_type("symlink", shown, field) from None
        raise


def read_bounded(fd: int, max_bytes: int) -> bytes:
    """All of ``fd``, refusing to hold more than ``max_bytes`` (the file may grow after the
    size check)."""
    chunks, size = [], 0
    while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:  # grew while we read it
            raise QuotaExceeded(f"the file grew above {max_bytes} bytes while being read")
    return b"".join(chunks)
