"""The runner's wire protocol on the host side, for every backend: the request, and the
result frame read from the runner's stdout (a Docker attach stream, a log, or a pipe).

``sandboxes/image/_runner_main.py`` documents the protocol itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import select
import socket
import time
from typing import Any

from producer.errors import SandboxError
from sandboxes.base import Limits, RunOutcome, RunSpec, Runtime, Usage

__all__ = [
    "encode_request",
    "fd_closed",
    "frame_outcome",
    "json_frame",
    "killed_outcome",
    "parse_frame",
    "read_frame",
]


def encode_request(spec: RunSpec, nonce: str, *, max_procs: int | None = None) -> bytes:
    """The runner's request: a JSON header line, the source, then the program's stdin."""
    source = spec.source.encode("utf-8")
    header: dict[str, Any] = {
        "v": 1,
        "language": spec.language,
        "source_len": len(source),
        "timeout_s": spec.limits.timeout_s,
        "output_bytes": spec.limits.output_bytes,
        "nonce": nonce,
    }
    if max_procs is not None:
        header["max_procs"] = max_procs
    return json.dumps(header).encode() + b"\n" + source + spec.stdin


def parse_frame(logs: bytes, nonce: str) -> dict[str, Any] | None:
    """The runner's result frame in the container's stdout log, or None if absent/garbled.

    The last line carrying our nonce wins: the runner writes it after every program process
    is dead, so a program that reached the log stream (possible under gVisor) cannot follow
    it. A nonce-less ``ok: false`` refusal counts only as the sole output of the run.
    """
    lines = [line for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        frame = json_frame(line)
        if frame is not None and frame.get("nonce") == nonce:
            return frame
    if len(lines) == 1:
        frame = json_frame(lines[0])
        if frame is not None and frame.get("nonce") is None and frame.get("ok") is False:
            return frame
    return None


def json_frame(line: bytes) -> dict[str, Any] | None:
    """One log line as a protocol-v1 frame, or None."""
    if not line.startswith(b"{"):
        return None
    try:
        frame = json.loads(line)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) and frame.get("v") == 1 else None


def fd_closed(stream: socket.socket | int) -> bool:
    """True if the other end closed (the container died or was removed).

    Nothing is ever sent to us before the request (the runner waits for it; a stdin-only
    attach carries nothing back), so readable means EOF or an error.
    """
    try:
        readable, _, _ = select.select([stream], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def read_frame(
    stream: socket.socket | int,
    nonce: str,
    deadline: float,
    limits: Limits,
    *,
    multiplexed: bool = True,
) -> tuple[dict[str, Any] | None, bool]:
    """Read the runner's stdout until its frame: (frame or None, deadline passed).

    ``stream``: a Docker attach socket (``multiplexed``: 8-byte headers of stream id, 3 zero
    bytes and a big-endian length before each payload; only stdout, id 1, is kept) or the
    read end of the runner's stdout pipe (a file descriptor, ``multiplexed=False``).
    Under runc the FIRST complete line carrying our nonce is the runner's frame and final:
    only the runner can write to its stdout (it is non-dumpable, so /proc/1/fd/1 cannot be
    opened by the program), the nonce was never inside the container before the request,
    and the runner writes the frame after every program process is dead. (Under gVisor
    the caller re-reads the log after exit instead.)
    None when the stream ends without one (the runner died) or grows past any real frame.
    """
    # A frame holds at most both capped streams in base64 plus a small header.
    max_bytes = 4 * limits.output_bytes + (1 << 20)
    raw, stdout = b"", b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True
        try:
            readable, _, _ = select.select([stream], [], [], remaining)
            if not readable:
                return None, True
            chunk = os.read(stream, 1 << 16) if isinstance(stream, int) else stream.recv(1 << 16)
        except (OSError, ValueError):
            return None, False
        if not chunk:
            return None, False
        if multiplexed:
            raw += chunk
            while len(raw) >= 8:
                size = int.from_bytes(raw[4:8], "big")
                if len(raw) < 8 + size:
                    break
                if raw[0] == 1:
                    stdout += raw[8 : 8 + size]
                raw = raw[8 + size :]
        else:
            stdout += chunk
        while b"\n" in stdout:
            line, _, stdout = stdout.partition(b"\n")
            frame = json_frame(line)
            if frame is not None and frame.get("nonce") == nonce:
                return frame, False
        if len(stdout) + len(raw) > max_bytes:
            return None, False


def frame_outcome(
    frame: dict[str, Any], sandbox_id: str, runtime: Runtime, watchdog_fired: bool, oom: bool
) -> RunOutcome:
    """The outcome a runner's frame reports; ``watchdog_fired`` (the host killed the
    sandbox) and ``oom`` (the host saw an OOM kill) are OR-ed into the runner's own. A
    refusal (``ok: false``, a request the runner would not run) is a ``SandboxError``."""
    if not frame.get("ok"):
        raise SandboxError(f"the sandbox runner refused the request: {frame.get('error')}")
    usage = frame.get("usage") or {}
    return RunOutcome(
        exit_code=frame.get("exit_code"),
        stdout=_b64(frame.get("stdout_b64")),
        stderr=_b64(frame.get("stderr_b64")),
        stdout_truncated=bool(frame.get("stdout_truncated")),
        stderr_truncated=bool(frame.get("stderr_truncated")),
        timed_out=bool(frame.get("timed_out")) or watchdog_fired,
        oom_killed=bool(frame.get("oom_killed")) or oom,
        usage=Usage(
            cpu_user_s=float(usage.get("utime_s", 0.0)),
            cpu_system_s=float(usage.get("stime_s", 0.0)),
            max_rss_kb=int(usage.get("maxrss_kb", 0)),
            wall_ms=int(usage.get("wall_ms", 0)),
        ),
        sandbox_id=sandbox_id,
        runtime=runtime,
    )


def killed_outcome(
    sandbox_id: str, runtime: Runtime, timed_out: bool, oom: bool, wall_ms: int
) -> RunOutcome:
    """The outcome of a run whose runner died without a frame: killed by the host at the
    deadline (``timed_out``) or by the OOM killer (``oom``)."""
    return RunOutcome(
        exit_code=None,
        stdout=b"",
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        timed_out=timed_out,
        oom_killed=oom,
        usage=Usage(wall_ms=wall_ms),
        sandbox_id=sandbox_id,
        runtime=runtime,
    )


def _b64(text: str | None) -> bytes:
    try:
        return base64.b64decode(text or "", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SandboxError(f"garbled output in the sandbox result frame: {exc}") from exc
