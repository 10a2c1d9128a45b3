"""Reading a warm container's Docker attach stream: the runner's result frame, and
whether the daemon closed the connection (the container died or was removed)."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

from sandboxes.base import Limits
from sandboxes.docker import json_frame

__all__ = ["read_frame", "socket_closed"]


def socket_closed(sock: socket.socket) -> bool:
    """True if the daemon closed the attach connection (the container died or was removed).

    Nothing is ever sent to us on a stdin-only attach, so readable means EOF or an error.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def read_frame(
    sock: socket.socket, nonce: str, deadline: float, limits: Limits
) -> tuple[dict[str, Any] | None, bool]:
    """Read the attach stream until the runner's frame: (frame or None, deadline passed).

    The stream is Docker's multiplexed format (8-byte header: stream id, 3 zero bytes, a
    big-endian length; then the payload); only stdout (id 1) is kept. Under runc the FIRST
    complete line carrying our nonce is the runner's frame and final: only the runner can
    write to its stdout (it is non-dumpable, so /proc/1/fd/1 cannot be opened by the
    program), the nonce was never inside the container before the request, and the runner
    writes the frame after every program process is dead. (Under gVisor the caller
    re-reads the log after exit instead.)
    None when the stream ends without one (the runner died) or grows past any real frame.
    """
    # A frame holds at most both capped streams in base64 plus a small header.
    max_bytes = 4 * limits.output_bytes + (1 << 20)
    raw, stdout = b"", b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            return None, True
        except OSError:
            return None, False
        if not chunk:
            return None, False
        raw += chunk
        while len(raw) >= 8:
            size = int.from_bytes(raw[4:8], "big")
            if len(raw) < 8 + size:
                break
            if raw[0] == 1:
                stdout += raw[8 : 8 + size]
            raw = raw[8 + size :]
        while b"\n" in stdout:
            line, _, stdout = stdout.partition(b"\n")
            frame = json_frame(line)
            if frame is not None and frame.get("nonce") == nonce:
                return frame, False
        if len(stdout) + len(raw) > max_bytes:
            return None, False
