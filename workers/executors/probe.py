"""TEST-ONLY FAKE executor: the reliability probe.

Reliability tests need hundreds of actions per second, failures on demand and an effect
they can count; a real sandboxed primitive cannot give that on a 2-core box (a container
costs ~300 ms). The probe serves the ``code`` queue ONLY when a worker runs with
``ACTIONFLEET_TEST_PROBE_EXECUTOR=1``; every other part of the path (client, broker,
Celery worker subprocess, pipeline, Redis limits) stays real.

The action's ``payload.source`` is a JSON object::

    {"sleep_s": 0.5,         # hold the worker slot this long (a "long action")
     "fail_times": 2,        # fail the first N attempts of this action
     "fail_type": "upstream_error" | "timeout" | "internal_error",
     "effect": true}         # append one line to <probe_dir>/effects.log when done

Every execution start is appended to ``runs.log``, every call of the effect to
``effect_calls.log`` and every effect applied to ``effects.log`` -- the fake upstream
applies one effect per idempotency key, like an API honouring an Idempotency-Key header
(one ``O_APPEND`` write each, atomic across processes), as JSON lines with the action
id, the attempt, the pid and the time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

from producer.errors import ActionTimeout, InternalError, UpstreamError, ValidationError_
from producer.models import Action, CodeAction
from workers.middleware import ActionContext
from workers.policy import Grant

__all__ = ["ReliabilityProbeExecutor"]

_FAILURES = {
    "upstream_error": UpstreamError,
    "timeout": ActionTimeout,
    "internal_error": InternalError,
}


def _append(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


class ReliabilityProbeExecutor:
    primitive: ClassVar[str] = "code"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, CodeAction)
        try:
            spec = json.loads(action.payload.source)
            assert isinstance(spec, dict)
        except (ValueError, AssertionError):
            raise ValidationError_(
                "the probe expects payload.source to be a JSON object", field="payload.source"
            ) from None
        # Count this action's earlier executions (across processes) to fail N times.
        runs_file = self.dir / "runs" / action.action_id
        runs_file.parent.mkdir(exist_ok=True)
        fd = os.open(runs_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            previous = os.fstat(fd).st_size
            os.write(fd, b".")
        finally:
            os.close(fd)
        stamp = {
            "action_id": action.action_id,
            "key": action.idempotency_key,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
        }
        _append(self.dir / "runs.log", stamp | {"time": time.time(), "tenant": action.tenant_id})
        if spec.get("sleep_s"):
            time.sleep(float(spec["sleep_s"]))
        if previous < int(spec.get("fail_times", 0)):
            kind = _FAILURES[spec.get("fail_type", "upstream_error")]
            raise kind(f"probe failure {previous + 1} of {spec['fail_times']}")
        if spec.get("effect"):
            self._effect(action, stamp)
        return {
            "exit_code": 0,
            "stdout": f"probe run {previous + 1}\n",
            "stderr": "",
            "stdout_truncated": False,
            "stderr_truncated": False,
            "usage": {"runtime": "probe", "executions": previous + 1},
        }

    def _effect(self, action: CodeAction, stamp: dict[str, Any]) -> None:
        """Call the fake "upstream": it applies an effect once per idempotency key, the
        way a real API honouring an Idempotency-Key header does (docs/reliability.md)."""
        now = time.time()
        _append(self.dir / "effect_calls.log", stamp | {"time": now})
        key = action.idempotency_key or action.action_id
        applied = self.dir / "applied"
        applied.mkdir(exist_ok=True)
        # Apply and record in one atomic step (link of a complete file): a worker killed
        # right after applying must not leave an effect that nothing recorded.
        tmp = applied / f".{key}.{os.getpid()}.{time.monotonic_ns()}"
        tmp.write_text(json.dumps(stamp | {"time": now}))
        try:
            os.link(tmp, applied / key)
        except FileExistsError:
            return
        finally:
            tmp.unlink()
        _append(self.dir / "effects.log", stamp | {"time": now})  # ordering/timing only

    def close(self) -> None:
        pass
