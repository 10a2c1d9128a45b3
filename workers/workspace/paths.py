"""What a workspace path may look like, checked as text before any file is touched.

Relative, no ``..``, no NUL or control characters, each component at most 255 bytes and
the whole at most 4096; names starting with the in-flight-write prefix are reserved. How
a valid path is then opened without escaping is ``workers/workspace/tenant.py``'s business.
"""

from __future__ import annotations

from producer.errors import ValidationError_

__all__ = [
    "MAX_COMPONENT_BYTES",
    "MAX_PATH_BYTES",
    "TMP_PREFIX",
    "bad_path",
    "show",
    "split_path",
    "tenant_dirname",
]

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
TMP_PREFIX = ".af-tmp-"  # in-flight atomic writes; not counted, never listed


def bad_path(field: str, reason: str, fix: str) -> ValidationError_:
    """A path refused with the field, the reason and what to change."""
    return ValidationError_(f"{field}: {reason}; {fix}", field=field, reason=reason, fix=fix)


def split_path(path: str, field: str = "payload.path") -> list[str]:
    """Validate a workspace path as text; returns its components ([] is the root)."""
    if "\x00" in path:
        raise bad_path(field, "the path contains a NUL byte", "remove it")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise bad_path(field, "the path contains a control character", "use printable names")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise bad_path(
            field, f"the path is longer than {MAX_PATH_BYTES} bytes", "use a shorter path"
        )
    if path.startswith("/"):
        raise bad_path(
            field,
            "absolute paths are not allowed",
            "give a path relative to the workspace root, e.g. 'data/in.csv'",
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for part in parts:
        if part == "..":
            raise bad_path(field, "'..' is not allowed", "give a path inside the workspace")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise bad_path(
                field,
                f"the name {part[:40]!r}... is longer than {MAX_COMPONENT_BYTES} bytes",
                "use shorter names",
            )
        if part.startswith(TMP_PREFIX):
            raise bad_path(field, f"names starting {TMP_PREFIX!r} are reserved", "rename it")
    return parts


def tenant_dirname(tenant_id: str) -> str:
    """One safe directory name per tenant id (ids may contain '/'; '%' is not allowed in
    ids, so the escaping cannot collide)."""
    name = tenant_id.replace("/", "%2F")
    if not name or name.startswith(".") or len(name.encode()) > MAX_COMPONENT_BYTES:
        raise ValidationError_(f"tenant id {tenant_id!r} cannot name a workspace")
    return name


def show(parts: list[str]) -> str:
    """A component list as the path a user wrote (``.`` for the root)."""
    return "/".join(parts) or "."
