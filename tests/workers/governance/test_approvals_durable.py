"""A parked action survives its worker being SIGKILLed and Redis being restarted: it is
still awaiting afterwards, then approvable, and runs once. The approved run happens on a
worker whose clock-skew window the signature left long ago: the park's replay check
stands for it (docs/policy.md)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_redis
from tests.governance_fixtures import GovFleet, make_fleet
from tests.workers.governance.test_approvals import park, parked_code, run_count

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("tripwire")]

SKEW_S = 3  # the second worker's allowed clock difference


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[GovFleet]:
    f = make_fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def test_parked_action_survives_worker_and_redis_restarts(fleet: GovFleet) -> None:
    worker = fleet.start()
    action = parked_code()
    handle, approval_id = park(fleet, action)
    signed_ms = handle.action.auth.ts if handle.action.auth else None  # type: ignore[union-attr]
    # The worker host dies (pool processes and main process at once); another worker,
    # with a short clock-skew window, takes its place; then Redis restarts under it.
    for pid in worker.pool_pids():
        os.kill(pid, signal.SIGKILL)
    worker.stop(signal.SIGKILL)
    fleet.start(auth_skew_s=str(SKEW_S))
    fleet.redis.proc.terminate()
    fleet.redis.proc.wait(10)
    fleet.redis = start_redis(fleet.redis.dir, appendonly=True, port=fleet.redis.port)

    code, shown = fleet.cli_json("approvals", "show", approval_id)
    assert code == 0 and shown["status"] == "pending", shown
    # Past the signature's clock window before anyone approves.
    signed = (signed_ms or 0) / 1000 if signed_ms else time.time()
    while time.time() < signed + SKEW_S + 1:
        time.sleep(0.2)
    code, out = fleet.cli_json("approvals", "approve", approval_id, "--reason", "after restart")
    assert code == 0 and out["status"] == "approved", out
    final = handle.result(timeout=120, final=True)
    assert final.ok, (final, fleet.worker.tail() if fleet.worker else "")
    assert run_count(fleet, action["action_id"]) == 1
