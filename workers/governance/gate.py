"""The approval gate: what the pipeline does with an action a rule sends to a human.

``ApprovalGate.check`` on a delivery whose verdict is ``require_approval``:

- first delivery: park it (``ApprovalStore.park``, with the replay check of its
  signature's nonce), announce it (webhook), and raise ``AwaitingApproval``: the result
  ``awaiting_approval`` goes to the producer at once, the message is acknowledged.
- a delivery while it waits (a redelivery): ``AwaitingApproval`` again, nothing new.
- the decided message (sent back to the queue by the decider, or by the sweep):
  ``approved`` returns the record and the pipeline goes on to admission and the
  executor, where idempotency makes the run happen once; ``denied`` ends ``denied``
  (``policy_denied``, naming the approver and the reason); ``expired`` ends ``expired``.

A decision applies to the parked message only: a delivery under the same action id with
other content is refused. The decided run does not redo the replay check: the park did it,
for this exact message, inside the signature's clock window (docs/policy.md).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from producer.errors import DeadlinePassed, PolicyDenied, Unauthenticated
from producer.models import Action
from producer.transport import task_id_for
from workers.governance.approvals import ApprovalRecord, ApprovalStore, message_digest
from workers.governance.notify import notify_in_background
from workers.governance.rules import Verdict
from workers.middleware import ActionContext

__all__ = ["ApprovalGate", "AwaitingApproval"]


class AwaitingApproval(Exception):  # a control signal, not an error
    """Parked: the producer gets ``awaiting_approval``; the message is acknowledged."""

    def __init__(self, record: ApprovalRecord, verdict: Verdict, first: bool) -> None:
        super().__init__(f"action {record.id} awaits approval")
        self.record = record
        self.verdict = verdict
        self.first = first

    def output(self) -> dict[str, Any]:
        r = self.record
        return {
            "approval_id": r.id,
            "rule_id": r.rule_id,
            "description": r.description,
            "rules": r.rules,
            "expires_at": r.expires_at,
            "message": f"rule {r.rule_id!r} needs a human's approval: {r.description}. The "
            f"action waits until {r.expires_at}; its result arrives on the same handle "
            f"(approve with `actionfleet approvals approve {r.id} --reason ...`)",
        }


class ApprovalGate:
    def __init__(self, store: ApprovalStore, *, nonce_ttl_s: int = 86_400) -> None:
        self.store = store
        self.nonce_ttl_s = nonce_ttl_s

    def check(self, ctx: ActionContext, action: Action, verdict: Verdict) -> ApprovalRecord:
        """Returns the approved record, or raises ``AwaitingApproval``, ``PolicyDenied``,
        ``DeadlinePassed`` or ``Unauthenticated`` (a replayed nonce)."""
        rule = verdict.rule
        wait = timedelta(seconds=verdict.timeout_s or 3600)
        expires = self.store.now() + wait
        if action.deadline is not None and action.deadline < expires:
            expires = action.deadline
        nonce = ctx.extra.pop("_nonce", None)  # workers.auth.verify.NonceCheck
        fields: dict[str, str | int] = {
            "tenant_id": action.tenant_id,
            "agent_id": action.agent_id,
            "primitive": action.primitive,
            "action": verdict.request.action,
            "rule_id": rule.id,
            "description": rule.description,
            "rules": json.dumps([r.id for r in verdict.rules]),
        }
        outcome = self.store.park(
            ctx.raw,
            fields,
            expires,
            nonce=nonce,
            nonce_ttl_s=self.nonce_ttl_s + int(wait.total_seconds()),
        )
        if outcome in ("replay", "stale"):
            assert nonce is not None
            raise nonce.refusal(outcome)
        approval_id = task_id_for(action.tenant_id, action.action_id)
        record = self.store.get(approval_id)
        if record is None:  # dropped between the two calls (retention): treat as gone
            raise PolicyDenied(
                f"the approval record of {approval_id} is gone; send the action again",
                reason="approval_missing",
                rule_id=rule.id,
            )
        if outcome == "parked":
            webhook = verdict.approvals.webhook if verdict.approvals else None
            if webhook is not None:
                notify_in_background(webhook, _announcement(record))
            raise AwaitingApproval(record, verdict, first=True)
        if record.digest != message_digest(ctx.raw):
            raise Unauthenticated(
                f"action {action.action_id} has an approval record for another message: a "
                "decision applies to the message that was parked; send new content under a "
                "new action_id",
                reason="approval_mismatch",
            )
        if record.status == "pending":
            raise AwaitingApproval(record, verdict, first=False)
        self.store.take(approval_id)
        if record.status == "approved":
            return record
        if record.status == "denied":
            raise PolicyDenied(
                f"{record.decided_by} denied this action (rule {record.rule_id!r}: "
                f"{record.description}): {record.reason}. Do not retry it as is",
                reason="approval_denied",
                rule_id=record.rule_id,
                rule_description=record.description,
                approver=record.decided_by,
                approver_reason=record.reason,
            )
        raise DeadlinePassed(
            f"nobody approved this action before {record.expires_at} (rule "
            f"{record.rule_id!r}: {record.description}); send it again if it is still "
            "needed, and ask an approver to look at it",
            reason="approval_timeout",
            rule_id=record.rule_id,
            expires_at=record.expires_at,
        )


def _announcement(record: ApprovalRecord) -> dict[str, Any]:
    body = record.public(with_payload=True)
    body["event"] = "approval_requested"
    body["decide"] = {
        "cli": f"actionfleet approvals approve|deny {record.id} --reason TEXT",
        "http": f"POST /approvals/{record.id}/approve|deny",
    }
    return body
