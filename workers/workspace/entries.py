"""What a workspace entry is, and the structured refusals for entries that cannot be used.

Shared by the descriptor walk (``workspace_walk``), the quota accounting and the operations
in ``workspace``: one place decides what counts as a usable regular file and how a wrong
kind of entry is reported (field/reason/fix details for the agent).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from producer.errors import ActionError, Conflict
from workers.workspace.paths import bad_path

EntryType = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True, slots=True)
class FileData:
    path: str
    data: bytes
    sha256: str
    modified: str


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def type_of(mode: int) -> EntryType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def not_a_dir(st: os.stat_result | None, shown: str, field: str) -> ActionError:
    """The error for a path component that had to be a directory and is not."""
    kind = type_of(st.st_mode) if st is not None else "other"
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


def refuse_type(kind: EntryType, shown: str, field: str) -> ActionError:
    """The error for an entry that had to be a regular file and is ``kind``."""
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


def check_regular(st: os.stat_result, shown: str, field: str) -> None:
    """Only regular files with one link are read or replaced (docs/files.md, rule 3)."""
    kind = type_of(st.st_mode)
    if kind != "file":
        raise refuse_type(kind, shown, field)
    if st.st_nlink > 1:
        raise bad_path(
            field,
            f"{shown!r} has {st.st_nlink} hard links; hard-linked files are refused",
            "copy the data to a new file instead of linking it",
        )
