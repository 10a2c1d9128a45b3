"""Which failures are retried, how often, and after how long (exponential backoff + jitter).

The ``retries`` section of a tenant's policy::

    retries:
      max_attempts: {code: 3, api: 5}     # attempts in all, per primitive (1: never retry)
      backoff_s: 1.0                      # first retry after ~1 s, then ~2 s, ~4 s ...
      backoff_max_s: 60
      retry_on: [upstream_error, sandbox_error, internal_error]

``timeout`` is not retried by default: an action that used up its time will most likely
use it up again, at the same cost; the agent can raise ``timeout_s`` instead.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field

from producer.errors import ErrorType
from producer.models import Primitive

__all__ = ["RetryPolicy", "backoff_s"]

DEFAULT_ATTEMPTS = 3


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_attempts: dict[Primitive, int] = Field(default_factory=dict)
    default_max_attempts: int = Field(DEFAULT_ATTEMPTS, ge=1, le=100)
    backoff_s: float = Field(1.0, gt=0, le=3_600)
    backoff_max_s: float = Field(60.0, gt=0, le=86_400)
    retry_on: list[ErrorType] = Field(
        default_factory=lambda: ["upstream_error", "sandbox_error", "internal_error"]
    )

    def attempts_for(self, primitive: str) -> int:
        return self.max_attempts.get(primitive, self.default_max_attempts)  # type: ignore[call-overload]


def backoff_s(policy: RetryPolicy, failures: int, rng: random.Random | None = None) -> float:
    """Delay before the retry that follows ``failures`` failed attempts.

    "Equal jitter": half the exponential step is fixed, half random, so retries of many
    actions that failed together (an upstream outage) spread out instead of returning
    in one wave, while each still waits at least half its step.
    """
    step = min(policy.backoff_max_s, policy.backoff_s * 2 ** max(0, failures - 1))
    return step / 2 + (rng or random).uniform(0, step / 2)
