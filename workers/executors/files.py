"""The ``files`` primitive: read, write, list, stat, delete, mkdir and move in the tenant's
workspace. Path safety, atomic writes and quotas live in ``workers.workspace.tenant``; this module
maps payloads to those calls and shapes the output. No Docker and no heavy imports: a
``stat`` is a handful of syscalls (it is the fleet's "trivial action")."""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar

from producer.errors import ValidationError_
from producer.models import Action, FilesAction
from workers.middleware import ActionContext
from workers.policy import FilesLimits, Grant
from workers.workspace.tenant import Quota, Workspaces

__all__ = ["FilesExecutor"]


def _quota(limits: FilesLimits) -> Quota:
    return Quota(
        max_file_bytes=limits.max_file_bytes,
        max_total_bytes=limits.max_total_bytes,
        max_entries=limits.max_files,
    )


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "utf-8":
        return content.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError_(
            "payload.content is not valid base64; encode the bytes with standard base64 "
            "(A-Z a-z 0-9 + /, padded with =) or send text with encoding 'utf-8'",
            field="payload.content",
            reason="not valid base64",
            fix="encode with standard base64, or use encoding 'utf-8'",
        ) from None


def _encode(data: bytes, encoding: str, path: str) -> str:
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError_(
            f"{path!r} is not UTF-8 text (byte {exc.start}); read it with encoding 'base64'",
            field="payload.encoding",
            reason="the file is not valid UTF-8",
            fix="send encoding 'base64'",
        ) from None


class FilesExecutor:
    """Thread-safe: it holds no state besides the workspace root."""

    primitive: ClassVar[str] = "files"

    def __init__(self, workspaces: Workspaces) -> None:
        self.workspaces = workspaces

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, FilesAction)
        p = action.payload
        limits = grant.tenant.files
        ws = self.workspaces.tenant(action.tenant_id)
        if p.op == "read":
            got = ws.read(p.path, limits.max_read_bytes)
            return {
                "op": "read",
                "path": got.path,
                "encoding": p.encoding,
                "content": _encode(got.data, p.encoding, got.path),
                "size": len(got.data),
                "sha256": got.sha256,
                "modified": got.modified,
            }
        if p.op == "write":
            assert p.content is not None  # the payload model requires it for write
            out = ws.write(p.path, _decode(p.content, p.encoding), _quota(limits))
        elif p.op == "list":
            out = ws.list(p.path, limits.max_list_entries)
        elif p.op == "stat":
            out = ws.stat(p.path)
        elif p.op == "delete":
            out = ws.delete(p.path)
        elif p.op == "mkdir":
            out = ws.mkdir(p.path, _quota(limits))
        else:  # move; the payload model requires dest
            assert p.dest is not None
            out = ws.move(p.path, p.dest, _quota(limits))
        return {"op": p.op, **out}

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own descriptors."""
