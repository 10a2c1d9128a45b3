"""Quota accounting for a tenant workspace: the limits, the per-tenant lock, measured usage.

Usage is measured by walking the tenant tree, not kept in a counter, so files written by code
actions count too. Checks run under an exclusive ``flock`` on ``<root>/.locks/<tenant>.lock``,
before anything is written. ``flock`` serializes workers of one host, and of several hosts
only where the shared volume implements ``flock`` across clients; see docs/files.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from producer.errors import QuotaExceeded
from workers.workspace.paths import TMP_PREFIX
from workers.workspace.walk import DIR_FLAGS, lstat_at

# Tenant directory names cannot start with "." (tenant ids start with a letter or digit),
# so the lock directory can never collide with a tenant.
LOCK_DIR = ".locks"


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-tenant limits on what the workspace may hold (from policy ``files``)."""

    max_file_bytes: int
    max_total_bytes: int
    max_entries: int  # files, directories and anything else, the root excluded


@contextlib.contextmanager
def tenant_lock(open_root: Callable[[], int], dirname: str) -> Iterator[None]:
    """Exclusive per-tenant lock, outside the tenant dir so code cannot touch it.
    ``open_root`` returns a new descriptor of the workspace root (closed here)."""
    root = open_root()
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(LOCK_DIR, 0o700, dir_fd=root)
        locks = os.open(LOCK_DIR, DIR_FLAGS, dir_fd=root)
    finally:
        os.close(root)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"{dirname}.lock", flags, 0o600, dir_fd=locks)
    finally:
        os.close(locks)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def measure_usage(tenant_root: int) -> tuple[int, int]:
    """(bytes of regular files, number of entries) below the tenant directory descriptor."""
    total = entries = 0
    # fwalk is fd-based and never follows symlinks (it re-checks each directory
    # it enters against the lstat it saw), so a code action cannot redirect it.
    for _dirpath, dirs, files, dfd in os.fwalk(".", dir_fd=tenant_root):
        entries += len(dirs)
        for name in files:
            if name.startswith(TMP_PREFIX):
                continue
            entries += 1
            st = lstat_at(dfd, name)
            if st is not None and stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total, entries


def check_quota(
    usage: tuple[int, int],
    quota: Quota,
    field: str,
    *,
    add_bytes: int = 0,
    add_entries: int = 0,
) -> None:
    """Refuse (``QuotaExceeded``) a change that would take ``usage`` above ``quota``."""
    total, entries = usage
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
