"""Per-tenant policy: which primitives a tenant may use and its resource ceilings.

The policy file (``ACTIONFLEET_POLICY``, YAML) has a ``default`` profile and per-tenant
overrides that are deep-merged over it::

    version: 1
    default:
      primitives: [browse, code, files, email, api]
      code: {max_timeout_s: 60, max_memory_mb: 512}
    tenants:
      acme:
        primitives: [code]
        code: {max_memory_mb: 1024}

Without a file every tenant gets the built-in default profile. Requests above a ceiling
are refused (``policy_denied``) with the ceiling in the message, rather than silently
lowered, so the agent learns the real limit.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from producer.errors import PolicyDenied
from producer.models import PRIMITIVES, Action, BrowseAction, CodeAction, Primitive
from sandboxes.base import Limits
from workers.governance.rules import RulesConfig, Ruleset, Verdict
from workers.guarantees.limits import LimitsPolicy
from workers.guarantees.retries import RetryPolicy
from workers.outbound.egress import EgressPolicy

__all__ = [
    "BrowseLimits",
    "CodeLimits",
    "FilesLimits",
    "Grant",
    "PolicyEngine",
    "PolicyFile",
    "TenantPolicy",
    "load_policy",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeLimits(_Strict):
    default_timeout_s: float = Field(30, gt=0)
    max_timeout_s: float = Field(300, gt=0)
    default_memory_mb: int = Field(256, ge=16)
    max_memory_mb: int = Field(1024, ge=16)
    default_cpus: float = Field(1.0, gt=0)
    max_cpus: float = Field(2.0, gt=0)
    pids: int = Field(128, ge=8, le=4096)
    output_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    tmpfs_mb: int = Field(64, ge=1, le=4096)
    network: bool = False
    workspace: Literal["none", "ro", "rw"] = "rw"

    @model_validator(mode="after")
    def _defaults_within_max(self) -> CodeLimits:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s is above max_timeout_s")
        if self.default_memory_mb > self.max_memory_mb:
            raise ValueError("default_memory_mb is above max_memory_mb")
        if self.default_cpus > self.max_cpus:
            raise ValueError("default_cpus is above max_cpus")
        return self


class ApiPolicy(_Strict):
    """The ``api`` section: limits of one HTTP action (docs/api-email.md)."""

    default_timeout_s: float = Field(30, gt=0)
    max_timeout_s: float = Field(120, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)
    max_redirects: int = Field(5, ge=0, le=20)
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    send_idempotency_key: bool = True


class EmailPolicy(_Strict):
    """The ``email`` section. Fails closed: with no allowed domain or address, no email
    can be sent (a dry run still renders and reports what would be refused)."""

    allow_domains: list[str] = Field(default_factory=list, description="'x.com' or '*.x.com'")
    allow_addresses: list[str] = Field(default_factory=list)
    max_recipients: int = Field(20, ge=1, le=300)
    max_attachment_bytes: int = Field(10 << 20, ge=0, le=64 << 20)


class FilesLimits(_Strict):
    """The tenant workspace's quota (checked before anything is written) and read bounds."""

    max_file_bytes: int = Field(8 << 20, ge=1, description="largest file a write may create")
    max_total_bytes: int = Field(1 << 30, ge=1, description="all regular files together")
    max_files: int = Field(10_000, ge=1, description="files and directories together")
    max_read_bytes: int = Field(8 << 20, ge=1, le=64 << 20, description="largest file read")
    max_list_entries: int = Field(1_000, ge=1, le=100_000, description="entries per list")


class BrowseLimits(_Strict):
    """The ``browse`` section (docs/browse.md): one browse action's ceilings."""

    default_timeout_s: float = Field(30, gt=0)
    max_timeout_s: float = Field(120, gt=0)
    max_page_bytes: int = Field(32 << 20, ge=1024, description="all bytes a page pulls in")
    max_screenshot_bytes: int = Field(4 << 20, ge=1024, le=64 << 20)
    max_extract_chars: int = Field(1 << 20, ge=1024, le=16 << 20, description="per extract")
    subresource_refusal: Literal["drop", "deny"] = Field(
        "drop",
        description="a sub-resource refused only by the domain lists: 'drop' it and go on "
        "(listed in output.blocked), or 'deny' the whole action",
    )
    max_pdf_bytes: int = Field(
        16 << 20, ge=1024, le=256 << 20, description="largest PDF a browse action reads"
    )
    max_pdf_pages: int = Field(200, ge=1, le=10_000, description="PDF pages read for text")

    @model_validator(mode="after")
    def _defaults_within_max(self) -> BrowseLimits:
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError("default_timeout_s is above max_timeout_s")
        return self


class TenantPolicy(_Strict):
    primitives: list[Primitive] = Field(default_factory=lambda: list(PRIMITIVES))
    code: CodeLimits = Field(default_factory=CodeLimits)
    files: FilesLimits = Field(default_factory=FilesLimits)
    egress: EgressPolicy = Field(default_factory=EgressPolicy)
    limits: LimitsPolicy = Field(default_factory=LimitsPolicy)
    retries: RetryPolicy = Field(default_factory=RetryPolicy)
    api: ApiPolicy = Field(default_factory=ApiPolicy)
    email: EmailPolicy = Field(default_factory=EmailPolicy)
    browse: BrowseLimits = Field(default_factory=BrowseLimits)


class PolicyFile(_Strict):
    version: Literal[1] = 1
    default: TenantPolicy = Field(default_factory=TenantPolicy)
    tenants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    rules: RulesConfig | None = Field(None, description="Cedar rules per agent and argument")
    _ruleset: Ruleset | None = PrivateAttr(None)

    @property
    def ruleset(self) -> Ruleset | None:
        """The compiled ``rules`` section (``load_policy`` compiles it)."""
        if self._ruleset is None and self.rules is not None:
            self._ruleset = Ruleset(self.rules)
        return self._ruleset

    def for_tenant(self, tenant_id: str) -> TenantPolicy:
        override = self.tenants.get(tenant_id)
        if not override:
            return self.default
        merged = _deep_merge(self.default.model_dump(), override)
        return TenantPolicy.model_validate(merged)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_policy(path: Path | None) -> PolicyFile:
    """Load and fully validate a policy file (every tenant too), or the built-in default."""
    if path is None:
        return PolicyFile()
    import yaml  # worker-side dependency only

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        policy = PolicyFile.model_validate(data)
        for tenant in policy.tenants:  # fail at load, not on the tenant's first action
            policy.for_tenant(tenant)
        if policy.rules is not None:  # Cedar: parsed and type-checked here, not per action
            policy._ruleset = Ruleset(policy.rules, base_dir=Path(path).parent)
    except (OSError, yaml.YAMLError, ValidationError, ValueError) as exc:
        raise ValueError(f"policy file {path} is invalid: {exc}") from exc
    return policy


@dataclass(frozen=True, slots=True)
class Grant:
    """What policy allows this one action: the resolved, capped limits."""

    tenant: TenantPolicy
    limits: Limits | None = None  # set for sandboxed primitives
    workspace: Literal["none", "ro", "rw"] = "none"
    reason: str = "allowed"
    # The Cedar rules' verdict (None without a ``rules`` section); ``require_approval``
    # sends the action to the approval gate (workers/governance/gate.py).
    verdict: Verdict | None = None

    @property
    def needs_approval(self) -> bool:
        return self.verdict is not None and self.verdict.outcome == "require_approval"


def _ceiling(field: str, asked: float | None, default: float, ceiling: float, unit: str) -> float:
    if asked is None:
        return default
    if asked > ceiling:
        raise PolicyDenied(
            f"{field} {asked:g}{unit} is above this tenant's limit of {ceiling:g}{unit}; "
            f"ask for at most {ceiling:g}{unit}",
            field=f"payload.{field}",
            asked=asked,
            limit=ceiling,
        )
    return asked


class PolicyEngine:
    """Authorizes actions against the policy file; reloads it when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._policy = load_policy(path)

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime if self.path else None
        except OSError:
            return None

    def current(self) -> PolicyFile:
        mtime = self._stat()
        if mtime != self._mtime:
            with self._lock:
                try:
                    self._policy = load_policy(self.path)
                except ValueError:
                    # Keep serving the last good policy; a broken edit must not open or
                    # close the whole fleet. The error is logged by the caller's logger.
                    import logging

                    logging.getLogger(__name__).exception("policy reload failed")
                self._mtime = mtime
        return self._policy

    def authorize(self, action: Action) -> Grant:
        """The tenant's ceilings, then the Cedar rules: a ``Grant`` (maybe needing
        approval), or ``PolicyDenied`` naming the ceiling or the rule."""
        policy = self.current()
        grant = self._ceilings(action, policy.for_tenant(action.tenant_id))
        rules = policy.ruleset
        if rules is None:
            return grant
        verdict = rules.decide(action)
        if verdict.outcome == "deny":
            raise verdict.denial()
        ids = ", ".join(r.id for r in verdict.rules)
        reason = f"needs approval ({ids})" if verdict.outcome != "allow" else f"allowed ({ids})"
        return replace(grant, verdict=verdict, reason=reason)

    def _ceilings(self, action: Action, tenant: TenantPolicy) -> Grant:
        if action.primitive not in tenant.primitives:
            raise PolicyDenied(
                f"tenant {action.tenant_id!r} may not use primitive {action.primitive!r}; "
                f"allowed: {', '.join(tenant.primitives) or 'none'}",
                primitive=action.primitive,
            )
        if isinstance(action, CodeAction):
            return self._authorize_code(action, tenant)
        if isinstance(action, BrowseAction):
            b, asked = tenant.browse, action.payload.timeout_s
            _ceiling("timeout_s", asked, b.default_timeout_s, b.max_timeout_s, "s")
        return Grant(tenant=tenant)

    def _authorize_code(self, action: CodeAction, tenant: TenantPolicy) -> Grant:
        c, p = tenant.code, action.payload
        timeout = _ceiling("timeout_s", p.timeout_s, c.default_timeout_s, c.max_timeout_s, "s")
        memory = _ceiling("memory_mb", p.memory_mb, c.default_memory_mb, c.max_memory_mb, "MB")
        cpus = _ceiling("cpus", p.cpus, c.default_cpus, c.max_cpus, "")
        order = ["none", "ro", "rw"]
        if order.index(p.workspace) > order.index(c.workspace):
            raise PolicyDenied(
                f"workspace {p.workspace!r} is not allowed for this tenant; "
                f"allowed up to {c.workspace!r}",
                field="payload.workspace",
            )
        limits = Limits(
            timeout_s=timeout,
            memory_mb=int(memory),
            cpus=cpus,
            pids=c.pids,
            output_bytes=c.output_bytes,
            tmpfs_mb=c.tmpfs_mb,
        )
        return Grant(tenant=tenant, limits=limits, workspace=p.workspace)
