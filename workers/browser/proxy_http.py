"""The few pieces of HTTP/1.1 the egress proxy speaks itself: reading and parsing a
request head, splitting a CONNECT authority, answering with a short status."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["HOP_HEADERS", "MAX_HEAD_BYTES", "parse_head", "read_head", "reply", "split_authority"]

MAX_HEAD_BYTES = 64 * 1024
_CHUNK = 64 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never forwarded upstream.
HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)


def read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            reply(sock, 431, "request head too large")
            return None, b""
        chunk = sock.recv(_CHUNK)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head: bytes) -> tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0][:200]!r}")
    method, target, version = parts
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("bad header line")
        headers.append((name.strip(), value.strip()))
    return method.upper(), target, version, headers


def split_authority(authority: str) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"CONNECT target {authority!r} has no port")
    return host.strip("[]"), int(port)


def reply(sock: socket.socket, status: int, reason: str) -> None:
    body = f"{status} {reason}\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError):
        sock.sendall(head + body)
