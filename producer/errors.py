"""ActionFleet's exception tree.

::

    ActionFleetError                   root of everything raised by ActionFleet
    ├── InvalidAction                  the message failed validation (nothing was sent)
    │   └── UnsupportedPrimitive       valid message, but this fleet has no executor for it
    ├── ResultTimeout                  the agent stopped waiting; the action may still run
    ├── FleetUnavailable               no broker / fleet answers
    └── ActionError                    an action ended without success; maps 1:1 to a result
        ├── PermanentError             retrying the same action will fail the same way
        │   ├── Unauthenticated        unauthenticated    -> status "denied"
        │   ├── PolicyDenied           policy_denied      -> status "denied"
        │   ├── QuotaExceeded          quota_exceeded     -> status "denied"
        │   ├── NetworkBlocked         network_blocked    -> status "denied"
        │   ├── ValidationError_       validation_error   -> status "invalid"
        │   ├── NotFound               not_found
        │   ├── Conflict               conflict
        │   └── ResourceExhausted      resource_exhausted
        └── RetryableError             the same action may succeed later
            ├── RateLimited            rate_limited
            ├── ActionTimeout          timeout            -> status "timed_out"
            │   └── DeadlinePassed     timeout            -> status "expired"
            ├── UpstreamError          upstream_error
            ├── SandboxError           sandbox_error
            └── InternalError          internal_error

``ActionError.to_info()`` gives the ``error`` object of a result; messages say what
happened and what to change, and never carry secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

ErrorType = Literal[
    "validation_error",
    "policy_denied",
    "rate_limited",
    "quota_exceeded",
    "timeout",
    "resource_exhausted",
    "network_blocked",
    "upstream_error",
    "not_found",
    "conflict",
    "sandbox_error",
    "internal_error",
    "unauthenticated",
]

Status = Literal[
    "succeeded", "failed", "denied", "timed_out", "expired", "invalid", "awaiting_approval"
]
"""``awaiting_approval`` is not final: a rule asked a human; the handle resolves later."""

__all__ = [
    "ActionError",
    "ActionFleetError",
    "ActionTimeout",
    "Conflict",
    "DeadlinePassed",
    "ErrorType",
    "FieldError",
    "FleetUnavailable",
    "InternalError",
    "InvalidAction",
    "NetworkBlocked",
    "NotFound",
    "PermanentError",
    "PolicyDenied",
    "QuotaExceeded",
    "RateLimited",
    "ResourceExhausted",
    "ResultTimeout",
    "RetryableError",
    "SandboxError",
    "Status",
    "Unauthenticated",
    "UnsupportedPrimitive",
    "UpstreamError",
    "ValidationError_",
]


class ActionFleetError(Exception):
    """Root of every error ActionFleet raises."""


FieldError = dict[str, str]
"""``{"field": "payload.source", "reason": "...", "fix": "..."}``."""


class InvalidAction(ActionFleetError):
    """An action message failed validation. ``errors`` lists one entry per bad field."""

    def __init__(self, errors: list[FieldError], index: int | None = None) -> None:
        self.errors = errors
        self.index = index
        where = f"action #{index}: " if index is not None else ""
        summary = "; ".join(f"{e['field']}: {e['reason']}" for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{where}invalid action: {summary}{more}")


class UnsupportedPrimitive(InvalidAction):
    """The message is valid but no executor for its primitive exists in this fleet."""

    def __init__(self, primitive: str, available: list[str]) -> None:
        super().__init__(
            [
                {
                    "field": "primitive",
                    "reason": f"primitive {primitive!r} has no executor in this fleet version",
                    "fix": f"use one of: {', '.join(available)}",
                }
            ]
        )
        self.primitive = primitive


class ResultTimeout(ActionFleetError, TimeoutError):
    """Waiting for a result took longer than the caller allowed. The action may still run."""


class FleetUnavailable(ActionFleetError):
    """No broker or fleet answers at the configured address."""


class ActionError(ActionFleetError):
    """An action ended without success. Subclasses fix ``type``, ``status`` and ``retryable``."""

    type: ClassVar[ErrorType] = "internal_error"
    status: ClassVar[Status] = "failed"
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        output: dict[str, Any] | None = None,
        retryable: bool | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if retryable is not None:  # an executor knows better than the class default
            self.retryable = retryable  # type: ignore[misc]
        # What the action produced before it failed (e.g. partial stdout of a timeout).
        self.output = output

    def to_info(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "message": self.message,
            "retryable": self.retryable,
            "details": self.details,
        }


class PermanentError(ActionError):
    retryable = False


class RetryableError(ActionError):
    retryable = True


class Unauthenticated(PermanentError):
    """No key, a bad signature, an unknown, revoked or expired key, a replayed nonce, or a
    timestamp outside the allowed clock skew: the action was never run."""

    type = "unauthenticated"
    status = "denied"


class PolicyDenied(PermanentError):
    type = "policy_denied"
    status = "denied"


class QuotaExceeded(PermanentError):
    type = "quota_exceeded"
    status = "denied"


class NetworkBlocked(PermanentError):
    type = "network_blocked"
    status = "denied"


class ValidationError_(PermanentError):
    type = "validation_error"
    status = "invalid"


class NotFound(PermanentError):
    type = "not_found"


class Conflict(PermanentError):
    type = "conflict"


class ResourceExhausted(PermanentError):
    type = "resource_exhausted"


class RateLimited(RetryableError):
    type = "rate_limited"


class ActionTimeout(RetryableError):
    type = "timeout"
    status = "timed_out"


class DeadlinePassed(ActionTimeout):
    status = "expired"
    retryable = False


class UpstreamError(RetryableError):
    type = "upstream_error"


class SandboxError(RetryableError):
    type = "sandbox_error"


class InternalError(RetryableError):
    type = "internal_error"
