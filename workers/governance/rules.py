"""Rules per agent and per argument: the ``rules`` section of the policy file, in Cedar.

::

    rules:
      default: allow                 # what no rule speaks of (allow | deny)
      groups:                        # agent groups / roles: fnmatch over "tenant/agent" or "agent"
        builders: ["builder-*", "acme/ci-bot"]
      cedar: |
        @id("no-report-deletes")
        @description("nothing under reports/ is ever deleted")
        forbid (principal, action == Action::"files:delete", resource)
        when { resource.path == "reports" || resource.path like "reports/*" };
      approvals: {timeout_s: 3600, webhook: {url: ..., egress: {...}}}

Outcomes, in this precedence: **deny > require_approval > allow**. A ``forbid`` rule denies;
a ``forbid`` rule annotated ``@outcome("approval")`` asks a human instead (Cedar has no
such effect: it is a forbid whose meaning we read from the annotation); ``permit`` rules
matter under ``default: deny``. Every rule needs ``@id`` (unique) and ``@description``
(what a refused agent is told). ``@timeout("30m")`` on an approval rule sets its own
approval timeout.

One Cedar evaluation per action, on the rules whose scope can match it: the set is sliced
per Cedar action when the file loads, then per principal (agent, tenant and groups) on
first use; both exact, since Cedar checks the scope before the conditions. A rule that
fails to evaluate (an error inside its condition) counts as satisfied: a broken forbid
must not open the fleet.

Decisions are kept per worker process: a decision is a pure function of what the rules can
see of a request, so it is keyed by the principal, action and resource, the groups, and
only the attributes some rule reads (``_Reads``): two emails with other bodies to the same
recipients, or files actions with other labels when no rule reads labels, share one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cedarpy
from cedarpy import pst
from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.errors import PolicyDenied
from producer.models import Action
from workers.governance.model import ACTIONS, SCHEMA, CedarRequest, request_for
from workers.outbound.egress import EgressPolicy

__all__ = [
    "ApprovalSettings",
    "Rule",
    "RulesConfig",
    "Ruleset",
    "Verdict",
    "WebhookSettings",
]

Outcome = Literal["allow", "deny", "require_approval"]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
_ERROR_POLICY = re.compile(r"policy `?([A-Za-z0-9_]+)`?")
_DECIDED_MAX = 4096  # decisions kept per worker process (per loaded policy)
_SLICES_MAX = 1024  # policy sets kept per (action, principal), likewise
_VARS = ("principal", "resource", "context")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookSettings(_Strict):
    """Where an approval request is announced (a POST of JSON), through the egress guard."""

    url: str = Field(min_length=1, max_length=2048)
    egress: EgressPolicy = Field(
        default_factory=EgressPolicy, description="the guard's rules for this URL"
    )
    timeout_s: float = Field(5.0, gt=0, le=60)


class ApprovalSettings(_Strict):
    timeout_s: float = Field(3600, gt=0, le=30 * 86_400, description="default approval wait")
    webhook: WebhookSettings | None = None


class RulesConfig(_Strict):
    default: Literal["allow", "deny"] = "allow"
    groups: dict[str, list[str]] = Field(default_factory=dict)
    cedar: str = Field("", description="Cedar policies")
    files: list[Path] = Field(default_factory=list, description="more .cedar files")
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)

    @field_validator("groups")
    @classmethod
    def _group_names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"group name {name!r}: letters, digits, '.', '_', '-'")
        return v


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``7d``."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"a duration like 30m, 1h or 7d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True, slots=True)
class Rule:
    """One Cedar policy with what its annotations say."""

    policy_id: str  # Cedar's own (policy0, policy1, ...)
    id: str  # @id
    description: str
    effect: Literal["permit", "forbid"]
    outcome: Literal["allow", "deny", "approval"]
    timeout_s: float | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "description": self.description}
        out |= {"effect": self.effect, "outcome": self.outcome}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


_DEFAULT_ALLOW_TEXT = """
@id("default-allow")
@description("what no rule forbids is allowed")
permit (principal, action, resource);"""
_DEFAULT_ALLOW = Rule("", "default-allow", "what no rule forbids is allowed", "permit", "allow")
_DEFAULT_DENY = Rule(
    "",
    "default-deny",
    "no rule permits this action (the policy allows only what it names)",
    "forbid",
    "deny",
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The rules' decision on one action, and the rules that made it."""

    outcome: Outcome
    rules: tuple[Rule, ...]
    request: CedarRequest
    errors: tuple[str, ...] = ()
    timeout_s: float | None = None  # require_approval: how long a human may take
    approvals: ApprovalSettings | None = None  # require_approval: the file's settings

    @property
    def rule(self) -> Rule:
        return self.rules[0]

    def denial(self) -> PolicyDenied:
        r = self.rule
        req = self.request
        return PolicyDenied(
            f"rule {r.id!r} forbids {req.action} on this {req.resource_type.lower()} for "
            f"agent {req.principal_attrs['id']!r}: "
            f"{r.description}. Choose an action the rules allow, or ask an operator to "
            "change the rule",
            reason="rule",
            rule_id=r.id,
            rule_description=r.description,
            rules=[x.id for x in self.rules],
            action=self.request.action,
        )

    def explain(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": self.outcome,
            "rules": [r.public() for r in self.rules],
            "request": self.request.explain(),
        }
        if self.errors:
            out["errors"] = list(self.errors)
        if self.timeout_s is not None:
            out["approval_timeout_s"] = self.timeout_s
        return out


# The action hierarchy (files:delete in files, in writes…), parsed once per process.
_ACTION_ENTITIES = cedarpy.Entities.from_json_str(
    json.dumps(
        [
            {
                "uid": {"type": "Action", "id": name},
                "attrs": {},
                "parents": [{"type": "Action", "id": g} for g in groups],
            }
            for name, groups in ACTIONS.items()
        ]
    )
)


def _rule(policy_id: str, node: Any) -> Rule:
    notes = dict(node.annotations)
    where = f"rule {policy_id} (the {int(policy_id.removeprefix('policy')) + 1}. policy)"
    rid, desc = notes.get("id"), notes.get("description")
    if not rid:
        raise ValueError(f'{where} has no @id("..."): every rule needs an id')
    if not desc:
        raise ValueError(f'rule {rid!r} has no @description("..."): say what it stops and why')
    effect = node.effect
    outcome = notes.get("outcome", "deny" if effect == "forbid" else "allow")
    if (effect, outcome) not in (("forbid", "deny"), ("forbid", "approval"), ("permit", "allow")):
        raise ValueError(
            f'rule {rid!r}: @outcome({outcome!r}) on a {effect} rule; use @outcome("approval") '
            "on a forbid rule, or none"
        )
    timeout = None
    if "timeout" in notes:
        try:
            timeout = parse_duration(notes["timeout"])
        except ValueError as exc:
            raise ValueError(f"rule {rid!r}: @timeout: {exc}") from None
    return Rule(policy_id, rid, desc, effect, outcome, timeout)


def _matches_action(scope: Any, action: str) -> bool:
    if isinstance(scope, pst.ScopeAny):
        return True
    names = {action, *ACTIONS[action]}
    if isinstance(scope, pst.ActionEq):
        return scope.entity.id in names
    return any(e.id in names for e in scope.entities)  # ActionIn


def _policy_set(nodes: dict[str, Any]) -> Any:
    """A Cedar policy set of these parsed rules (a slice of the file's)."""
    return cedarpy.PolicySet.from_pst(
        pst.PolicySet(templates={}, static_policies=nodes, template_links=())
    )


class _Reads:
    """What the rules read of a request: per variable, the attribute names read directly
    (``resource.path``, ``context has labels``), or every attribute when the variable is
    used any other way (``principal in Group::"g"``, a record holding it: conservative)."""

    def __init__(self, nodes: list[Any]) -> None:
        self.attrs: dict[str, set[str]] = {v: set() for v in _VARS}
        self.whole: set[str] = set()
        # The resource's uid matters only to a rule that scopes or compares it.
        self.resource_uid = any(not isinstance(n.resource, pst.ScopeAny) for n in nodes)
        stack: list[Any] = [c.expr for n in nodes for c in n.clauses]
        while stack:
            node = stack.pop()
            if isinstance(node, pst.GetAttr | pst.HasAttr) and isinstance(node.base, pst.Var):
                name = node.base.name
                if name in self.attrs:
                    attr = node.attr if isinstance(node, pst.GetAttr) else node.attrs[0]
                    self.attrs[name].add(attr)
                continue
            if isinstance(node, pst.Var):
                self.whole.add(node.name)
            elif isinstance(node, tuple):
                stack.extend(node)
            elif isinstance(node, dict):
                stack.extend(node.values())
            elif dataclasses.is_dataclass(node) and not isinstance(node, type):
                stack.extend(getattr(node, f.name) for f in dataclasses.fields(node))

    def pick(self, var: str, values: dict[str, Any]) -> dict[str, Any]:
        if var in self.whole:
            return values
        return {k: values[k] for k in self.attrs[var] if k in values}


def _principal_in_scope(scope: Any, principal: str, ancestors: frozenset[tuple[str, str]]) -> bool:
    """Whether a rule's principal scope can match this agent (its uid, type and parents)."""
    me = ("Agent", principal)
    if isinstance(scope, pst.ScopeAny):
        return True
    if isinstance(scope, pst.ScopeIs):
        return scope.entity_type.basename == "Agent"
    entity = getattr(scope, "entity", None)
    if not isinstance(entity, pst.EntityUid):
        return True  # a slot or a node this version does not know: keep the rule
    uid = (entity.type.basename, entity.id)
    if isinstance(scope, pst.ScopeEq):
        return uid == me
    if isinstance(scope, pst.ScopeIn | pst.ScopeIsIn):
        if isinstance(scope, pst.ScopeIsIn) and scope.entity_type.basename != "Agent":
            return False
        return uid == me or uid in ancestors
    return True


class Ruleset:
    """The compiled ``rules`` section: one evaluator, used by workers and by
    ``actionfleet policy check`` alike (``PolicyEngine.authorize``)."""

    def __init__(self, config: RulesConfig, base_dir: Path | None = None) -> None:
        self.config = config
        text = config.cedar
        for f in config.files:
            path = f if f.is_absolute() or base_dir is None else base_dir / f
            text += "\n" + path.read_text()
        if config.default == "allow":
            text += _DEFAULT_ALLOW_TEXT
        try:
            parsed = cedarpy.PolicySet.from_str(text)
        except ValueError as exc:
            raise ValueError(f"rules: the Cedar text does not parse: {exc}") from None
        checked = cedarpy.validate_policies(text, SCHEMA)
        if not checked.validation_passed:
            names = checked.id_annotations_by_policy_id
            errs = "; ".join(
                f"rule {names.get(e.policy_id, e.policy_id)!r}: {e.error}" for e in checked.errors
            )
            raise ValueError(f"rules: {errs}")
        tree = parsed.to_pst()
        nodes = dict(tree.static_policies)
        if tree.templates:
            raise ValueError("rules: templates (?principal, ?resource) are not supported")
        self.rules: dict[str, Rule] = {pid: _rule(pid, n) for pid, n in nodes.items()}
        seen: dict[str, str] = {}
        for r in self.rules.values():
            if r.id in seen:
                raise ValueError(f"rules: two rules have @id({r.id!r}); ids must be unique")
            seen[r.id] = r.policy_id
        self.by_id = {r.id: r for r in self.rules.values()}
        # Per Cedar action, the rules whose scope can match it, and their policy set.
        self._by_action = {
            name: {pid: n for pid, n in nodes.items() if _matches_action(n.action, name)}
            for name in ACTIONS
        }
        self._sliced = {name: _policy_set(kept) for name, kept in self._by_action.items()}
        self._per_principal: OrderedDict[tuple[str, str, tuple[str, ...]], Any] = OrderedDict()
        self._reads = _Reads(list(nodes.values()))
        self._approval_free = config.default == "deny" and any(
            r.outcome == "approval" for r in self.rules.values()
        )
        self._groups = [(g, tuple(p)) for g, p in config.groups.items()]
        self.groups_of = lru_cache(maxsize=4096)(self._groups_of)
        self.count = len([r for r in self.rules.values() if r.id != "default-allow"])
        self._decided: OrderedDict[str, tuple[bool, tuple[str, ...], tuple[str, ...]]] = (
            OrderedDict()
        )

    def _groups_of(self, tenant: str, agent: str) -> list[str]:
        both = f"{tenant}/{agent}"
        return [
            g
            for g, patterns in self._groups
            if any(fnmatchcase(both if "/" in p else agent, p) for p in patterns)
        ]

    def _evaluate(self, req: CedarRequest, policies: Any) -> Any:
        groups = self.groups_of(req.principal_attrs["tenant"], req.principal_attrs["id"])
        entities = _ACTION_ENTITIES.with_added_json_str(json.dumps(req.entities(groups)))
        return cedarpy.is_authorized(req.request(), policies, entities)

    def _policies_for(self, req: CedarRequest, groups: list[str]) -> Any:
        """The action's slice, less the rules whose principal scope names another agent,
        tenant or group (made on first use, kept for the next ``_SLICES_MAX``)."""
        key = (req.action, req.principal, tuple(groups))
        found = self._per_principal.get(key)
        if found is not None:
            self._per_principal.move_to_end(key)
            return found
        ancestors = frozenset(
            [("Tenant", req.principal_attrs["tenant"]), *(("Group", g) for g in groups)]
        )
        nodes = self._by_action[req.action]
        keep = {
            pid: n
            for pid, n in nodes.items()
            if _principal_in_scope(n.principal, req.principal, ancestors)
        }
        found = self._sliced[req.action] if len(keep) == len(nodes) else _policy_set(keep)
        self._per_principal[key] = found
        if len(self._per_principal) > _SLICES_MAX:
            self._per_principal.popitem(last=False)
        return found

    def _key(self, req: CedarRequest, groups: list[str]) -> str:
        reads = self._reads
        return json.dumps(
            [
                req.principal,
                req.action,
                req.resource_type,
                req.resource_id if reads.resource_uid or "resource" in reads.whole else "",
                groups,
                reads.pick("principal", req.principal_attrs),
                reads.pick("resource", req.resource_attrs),
                reads.pick("context", req.context),
            ],
            sort_keys=True,
        )

    def _outcome(self, req: CedarRequest) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
        """(allowed, reasons, errors) of Cedar for ``req``. A decision is a pure function
        of the request, its entities and the rules, so the same request is answered from
        ``_decided`` (bounded; a reloaded policy is a new Ruleset with an empty one)."""
        groups = self.groups_of(req.principal_attrs["tenant"], req.principal_attrs["id"])
        key = self._key(req, groups)
        hit = self._decided.get(key)
        if hit is not None:
            self._decided.move_to_end(key)
            return hit
        res = self._evaluate(req, self._policies_for(req, groups))
        diag = res.diagnostics
        outcome = (bool(res.allowed), tuple(diag.reasons), tuple(diag.errors))
        self._decided[key] = outcome
        if len(self._decided) > _DECIDED_MAX:
            self._decided.popitem(last=False)
        return outcome

    def decide(self, action: Action) -> Verdict:
        req = request_for(action)
        allowed, reasons, errors = self._outcome(req)
        # An erroring rule is treated as satisfied (fail closed).
        erred = {m.group(1) for e in errors if (m := _ERROR_POLICY.search(e))}
        fired = [self.rules[p] for p in [*reasons, *sorted(erred)] if p in self.rules]
        deny = [r for r in fired if r.outcome == "deny"]
        approval = [r for r in fired if r.outcome == "approval"]
        if deny:
            return Verdict("deny", tuple(deny), req, errors)
        if approval:
            if self._approval_free and not self._permitted(req):
                return Verdict("deny", (_DEFAULT_DENY,), req, errors)
            timeouts = [r.timeout_s for r in approval if r.timeout_s is not None]
            wait = min(timeouts) if timeouts else self.config.approvals.timeout_s
            return Verdict(
                "require_approval", tuple(approval), req, errors, wait, self.config.approvals
            )
        if allowed:
            return Verdict("allow", tuple(fired) or (_DEFAULT_ALLOW,), req, errors)
        return Verdict("deny", (_DEFAULT_DENY,), req, errors)

    def _permitted(self, req: CedarRequest) -> bool:
        # Under default deny, approval rules fired: does any permit rule let it through?
        keep = {
            pid: n
            for pid, n in self._by_action[req.action].items()
            if self.rules[pid].outcome != "approval"
        }
        return bool(self._evaluate(req, _policy_set(keep)).allowed)
