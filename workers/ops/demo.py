"""``actionfleet demo``: up, a sample batch over every primitive, a summary, down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from producer.client import SUPPORTED_PRIMITIVES, ActionClient
from producer.errors import InvalidAction
from workers.config import get_settings
from workers.ops.fleet import fleet_status, read_fleet_file

__all__ = ["run_demo", "sample_actions"]


def _code(language: str, source: str, **payload: Any) -> dict[str, Any]:
    return {
        "primitive": "code",
        "tenant_id": "demo",
        "agent_id": "demo-agent",
        "user_id": "u-demo",
        "payload": {"language": language, "source": source, **payload},
    }


_OTHER_PAYLOADS: dict[str, dict[str, Any]] = {
    # Likewise for browse: the default policy refuses loopback, so the sample shows the
    # browser's egress proxy refusing a local address (no packet is sent).
    "browse": {"url": "http://127.0.0.1/", "extract": ["title", "text"]},
    "files": {"op": "write", "path": "demo/hello.txt", "content": "hello"},
    "email": {"to": ["ops@example.com"], "subject": "demo", "text": "hi", "dry_run": True},
    # No internet here and the default policy refuses loopback/private addresses, so the
    # api sample shows the egress guard refusing cloud metadata (an SSRF) before connecting.
    "api": {"method": "GET", "url": "http://169.254.169.254/latest/meta-data/"},
}
# The status a sample of a supported primitive ends with, when it is not "succeeded".
_OTHER_EXPECTED: dict[str, str] = {"api": "denied", "browse": "denied"}


def sample_actions() -> list[tuple[str, Any, str]]:
    """(what it shows, action, the status it should end with)."""
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    samples: list[tuple[str, Any, str]] = [
        ("python hello", _code("python", "print('hello from the sandbox')"), "succeeded"),
        (
            "bash pipeline",
            _code("bash", "seq 1 5 | paste -sd+ | bc 2>/dev/null || echo $((1+2+3+4+5))"),
            "succeeded",
        ),
        (
            "stdin to python",
            _code("python", "import sys; print(sys.stdin.read().upper())", stdin="shout"),
            "succeeded",
        ),
        ("non-zero exit", _code("python", "import sys; sys.exit(3)"), "succeeded"),
        (
            "no network in sandbox",
            _code(
                "python",
                "import socket\ntry:\n    socket.getaddrinfo('example.invalid', 80)\n"
                "    print('resolved?!')\nexcept OSError as e:\n    print('no network:', e)",
            ),
            "succeeded",
        ),
        (
            "infinite loop, 2 s timeout",
            _code("python", "while True: pass", timeout_s=2),
            "timed_out",
        ),
        (
            "memory bomb, 64 MB",
            _code("python", "x = bytearray(512 * 1024 * 1024)", memory_mb=64),
            "failed",
        ),
        ("above policy ceiling", _code("python", "print(1)", memory_mb=8192), "denied"),
        ("deadline passed", _code("python", "print(1)") | {"deadline": past}, "expired"),
        ("unknown field", _code("python", "print(1)") | {"colour": "red"}, "invalid"),
    ]
    for p, payload in _OTHER_PAYLOADS.items():
        supported = p in SUPPORTED_PRIMITIVES
        action = {"primitive": p, "tenant_id": "demo", "agent_id": "demo-agent", "payload": payload}
        # Refused up front (nothing queued) until the primitive's executor lands.
        expected = _OTHER_EXPECTED.get(p, "succeeded") if supported else "invalid"
        samples.append((f"{p} primitive", action, expected))
    return samples


def _start_fleet() -> subprocess.Popen[bytes] | None:
    settings = get_settings()
    info = read_fleet_file(settings)
    if info:
        try:
            fleet_status(settings, timeout=1)
            print(f"using the fleet already running from {settings.home}", file=sys.stderr)
            return None
        except Exception:
            pass
    print("starting a local fleet (actionfleet up)...", file=sys.stderr, flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "workers.ops.cli", "up"], env=dict(os.environ))
    deadline = time.monotonic() + 900  # a first run builds the sandbox image
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"actionfleet up exited with {proc.returncode}")
        if (info := read_fleet_file(settings)) and int(info["pid"]) == proc.pid:
            return proc
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    raise SystemExit("the fleet did not become ready in time")


def run_demo(keep: bool = False) -> int:
    proc = _start_fleet()
    try:
        return _run_batch()
    finally:
        if proc is not None and not keep:
            print("stopping the fleet...", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def _run_batch() -> int:
    samples = sample_actions()
    rows: list[tuple[str, str, str, str]] = []
    with ActionClient() as client:
        pending: list[tuple[str, str, Any]] = []
        for name, action, expected in samples:
            try:
                pending.append((name, expected, client.submit(action)))
            except InvalidAction as exc:
                pending.append((name, expected, exc))
        for name, expected, handle in pending:
            if isinstance(handle, InvalidAction):
                note = handle.errors[0]["reason"]
                rows.append((name, expected, "invalid", note))
                continue
            result = handle.result(timeout=120)
            if result.error is not None:
                note = f"{result.error.type}: {result.error.message}"
            else:
                out = result.output or {}
                if "exit_code" in out:
                    note = f"exit {out['exit_code']}: {str(out.get('stdout', '')).strip()}"
                else:  # other primitives: their own output, compactly
                    note = json.dumps(out, default=str)
            rows.append((name, expected, result.status, f"{result.duration_ms} ms, {note}"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'action':<{width}}  {'expected':<9}  {'got':<9}  detail")
    for name, expected, got, note in rows:
        mark = "" if got == expected else "  <-- unexpected"
        print(f"{name:<{width}}  {expected:<9}  {got:<9}  {note[:90]}{mark}")
    counts = Counter(r[2] for r in rows)
    ok = all(r[1] == r[2] for r in rows)
    print("\nsummary: " + json.dumps({"actions": len(rows), **counts, "as_expected": ok}))
    from audit.reports import demo_summary

    print("\n" + demo_summary(timeout_s=30, tenant_id="demo"))
    return 0 if ok else 1
