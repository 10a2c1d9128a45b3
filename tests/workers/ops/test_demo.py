"""``actionfleet demo`` as a new user runs it: its own Redis (with ACL users), auth
required with the operator key `up` makes, every primitive, every outcome as expected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_demo_runs_with_auth_required(sandbox_image: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTIONFLEET_")}
    env |= {"ACTIONFLEET_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "workers.ops.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert '"as_expected": true' in out.stdout, out.stdout[-3000:]
    # `up` said so, and its broker is the admin's ACL user (the password never shown).
    assert "auth: required" in out.stderr, out.stderr[-3000:]
    assert "broker: redis://af-admin:**@127.0.0.1:" in out.stderr, out.stderr[-3000:]
    assert not (tmp_path / "home" / "fleet.json").exists()  # the fleet is gone again
