"""Service checks for tests: skip locally when a service is missing, fail under CI=true."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(available: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when ``what`` is not available."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"required service missing under CI=true: {what}", pytrace=False)
    pytest.skip(f"service missing: {what}")
