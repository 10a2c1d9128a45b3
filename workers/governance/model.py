"""The Cedar vocabulary of the fleet, and an action message as a Cedar request.

Principal: ``Agent::"<tenant>/<agent>"`` (attributes ``tenant``, ``id``, ``user``,
``key``), a member of ``Tenant::"<tenant>"`` and of every ``Group`` the policy file puts it
in. Action: ``Action::"<primitive>:<operation>"`` (``files:delete``, ``api:POST``,
``email:send``, ``code:python``, ``browse:goto``), a member of ``Action::"<primitive>"``
and of ``Action::"read_only"`` or ``Action::"writes"`` where that applies. Resource: what
the action touches, one entity type per primitive (``File``, ``Sandbox``, ``Mail``,
``Endpoint``, ``Page``), with typed attributes (path, recipient domains, URL host…).
Context: the action's ``labels`` as ``"key=value"`` strings and its ``priority``.

``SCHEMA`` types all of it, so a policy that names an unknown attribute, action or entity
type is refused when the policy file loads (``cedarpy.validate_policies``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from producer.errors import ValidationError_
from producer.models import Action
from workers.outbound.egress import parse_host
from workers.workspace.paths import split_path

__all__ = [
    "ACTIONS",
    "ACTION_GROUPS",
    "SCHEMA",
    "CedarRequest",
    "action_id",
    "request_for",
]

# primitive -> operation -> extra groups (beyond the primitive's own group).
_OPS: dict[str, dict[str, tuple[str, ...]]] = {
    "files": {
        "read": ("read_only",),
        "list": ("read_only",),
        "stat": ("read_only",),
        "write": ("writes",),
        "delete": ("writes",),
        "mkdir": ("writes",),
        "move": ("writes",),
    },
    "api": {
        "GET": ("read_only",),
        "HEAD": ("read_only",),
        "OPTIONS": ("read_only",),
        "POST": ("writes",),
        "PUT": ("writes",),
        "PATCH": ("writes",),
        "DELETE": ("writes",),
    },
    "email": {"send": ("writes",), "dry_run": ()},
    "code": {"python": (), "bash": ()},
    "browse": {"goto": ("read_only",), "steps": ()},
}
_RESOURCE = {
    "files": "File",
    "api": "Endpoint",
    "email": "Mail",
    "code": "Sandbox",
    "browse": "Page",
}

# Every concrete action id -> the groups it is a member of.
ACTIONS: dict[str, tuple[str, ...]] = {
    f"{p}:{op}": (p, *extra) for p, ops in _OPS.items() for op, extra in ops.items()
}
ACTION_GROUPS: tuple[str, ...] = (*_OPS, "read_only", "writes")


def _schema() -> str:
    lines = [
        "entity Tenant;",
        "entity Group;",
        "entity Agent in [Group, Tenant] = "
        "{ tenant: String, id: String, user: String, key: String };",
        "entity File = { tenant: String, path: String, dest: String };",
        "entity Sandbox = { tenant: String, language: String, workspace: String, "
        "timeout_s: Long, memory_mb: Long };",
        "entity Mail = { tenant: String, recipients: Set<String>, domains: Set<String>, "
        "count: Long, attachments: Long };",
        "entity Endpoint = { tenant: String, url: String, scheme: String, host: String, "
        "port: Long, path: String, method: String };",
        "entity Page = { tenant: String, url: String, scheme: String, host: String, steps: Long };",
        "type Ctx = { labels: Set<String>, priority: Long };",
    ]
    lines += [f'action "{g}";' for g in ACTION_GROUPS]
    for name, groups in ACTIONS.items():
        parents = ", ".join(f'"{g}"' for g in groups)
        resource = _RESOURCE[name.split(":", 1)[0]]
        lines.append(
            f'action "{name}" in [{parents}] appliesTo '
            f"{{ principal: [Agent], resource: [{resource}], context: Ctx }};"
        )
    return "\n".join(lines)


SCHEMA = _schema()


def action_id(action: Action) -> str:
    """The Cedar action of a message: ``<primitive>:<operation>``."""
    p = action.payload
    if action.primitive == "files":
        return f"files:{p.op}"  # type: ignore[union-attr]
    if action.primitive == "api":
        return f"api:{p.method}"  # type: ignore[union-attr]
    if action.primitive == "email":
        return "email:dry_run" if p.dry_run else "email:send"  # type: ignore[union-attr]
    if action.primitive == "code":
        return f"code:{p.language}"  # type: ignore[union-attr]
    return "browse:steps" if p.steps else "browse:goto"  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class CedarRequest:
    """One action as Cedar sees it: the request and the entities it needs."""

    principal: str  # Agent id "<tenant>/<agent>"
    action: str
    resource_type: str
    resource_id: str
    principal_attrs: dict[str, Any]
    resource_attrs: dict[str, Any]
    context: dict[str, Any]

    def request(self) -> dict[str, Any]:
        return {
            "principal": {"type": "Agent", "id": self.principal},
            "action": {"type": "Action", "id": self.action},
            "resource": {"type": self.resource_type, "id": self.resource_id},
            "context": self.context,
        }

    def entities(self, groups: list[str]) -> list[dict[str, Any]]:
        parents = [{"type": "Tenant", "id": self.principal_attrs["tenant"]}]
        parents += [{"type": "Group", "id": g} for g in groups]
        return [
            {
                "uid": {"type": "Agent", "id": self.principal},
                "attrs": self.principal_attrs,
                "parents": parents,
            },
            {
                "uid": {"type": self.resource_type, "id": self.resource_id},
                "attrs": self.resource_attrs,
                "parents": [],
            },
        ]

    def explain(self) -> dict[str, Any]:
        """What the rules saw, for ``policy check --explain``."""
        return {
            "principal": {"Agent": self.principal, **self.principal_attrs},
            "action": self.action,
            "resource": {self.resource_type: self.resource_id, **self.resource_attrs},
            "context": self.context,
        }


def _path(path: str, field: str) -> str:
    # The workspace's own parser: './a//b' and 'a/b' are one path to a rule as to a file.
    try:
        return "/".join(split_path(path, field))
    except ValidationError_:
        return path  # refused by the files executor anyway; a rule still sees the text


def _url(url: str) -> dict[str, Any]:
    parts = urlsplit(url.strip())
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    except ValueError:
        port = 0
    host = parts.hostname or ""
    with contextlib.suppress(ValueError, UnicodeError):  # the guard refuses it later
        host = str(parse_host(host)) if host else ""
    return {
        "url": url,
        "scheme": parts.scheme.lower(),
        "host": host,
        "port": port,
        "path": parts.path or "/",
    }


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


def request_for(action: Action) -> CedarRequest:
    """The Cedar request of an action message (see the module docstring)."""
    tenant = action.tenant_id
    p: Any = action.payload
    name = action_id(action)
    primitive = action.primitive
    if primitive == "files":
        path = _path(p.path, "payload.path")
        dest = _path(p.dest, "payload.dest") if p.dest else ""
        rtype, rid, attrs = "File", path, {"path": path, "dest": dest}
    elif primitive == "code":
        timeout = math.ceil(p.timeout_s) if p.timeout_s is not None else 0
        attrs = {
            "language": p.language,
            "workspace": p.workspace,
            "timeout_s": timeout,
            "memory_mb": p.memory_mb or 0,
        }
        rtype, rid = "Sandbox", p.workspace
    elif primitive == "email":
        recipients = sorted({a.strip().lower() for a in [*p.to, *p.cc, *p.bcc]})
        attrs = {
            "recipients": recipients,
            "domains": sorted({_domain(a) for a in recipients}),
            "count": len(recipients),
            "attachments": len(p.attachments),
        }
        rtype, rid = "Mail", ",".join(attrs["domains"])[:256]
    elif primitive == "api":
        attrs = {**_url(p.url), "method": p.method}
        rtype, rid = "Endpoint", attrs["host"]
    else:
        u = _url(p.url)
        attrs = {k: u[k] for k in ("url", "scheme", "host")} | {"steps": len(p.steps)}
        rtype, rid = "Page", attrs["host"]
    return CedarRequest(
        principal=f"{tenant}/{action.agent_id}",
        action=name,
        resource_type=rtype,
        resource_id=rid,
        principal_attrs={
            "tenant": tenant,
            "id": action.agent_id,
            "user": action.user_id or "",
            "key": action.auth.key_id if action.auth is not None else "",
        },
        resource_attrs={"tenant": tenant, **attrs},
        context={
            "labels": sorted(f"{k}={v}" for k, v in action.labels.items()),
            "priority": action.priority,
        },
    )
