"""Action artifacts (screenshots) in the tenant's workspace, returned by reference.

Layout: ``<workspace_root>/<tenant>/.artifacts/<action_id>/<name>``. The write goes
through ``workers.workspace.tenant`` (symlink-proof descriptor walk, atomic replace, the
tenant's files quota), so an artifact is an ordinary workspace file: the files primitive
reads it at the returned ``path``, and it counts against the tenant's quota.
"""

from __future__ import annotations

from typing import Any

from workers.policy import FilesLimits
from workers.workspace.tenant import Quota, Workspaces

__all__ = ["save_artifact"]


def save_artifact(
    workspaces: Workspaces,
    files: FilesLimits,
    tenant_id: str,
    action_id: str,
    name: str,
    data: bytes,
    content_type: str,
) -> dict[str, Any]:
    quota = Quota(
        max_file_bytes=files.max_file_bytes,
        max_total_bytes=files.max_total_bytes,
        max_entries=files.max_files,
    )
    path = f".artifacts/{action_id}/{name}"
    written = workspaces.tenant(tenant_id).write(path, data, quota, field="payload.extract")
    return {
        "path": written["path"],
        "sha256": written["sha256"],
        "bytes": written["size"],
        "content_type": content_type,
    }
