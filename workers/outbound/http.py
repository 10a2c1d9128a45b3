"""The guarded HTTP transport: every connection httpx opens goes through ``EgressGuard``.

``GuardedTransport.handle_request`` checks the request's URL (scheme, port, tenant domain
policy, every resolved address) and records the pinned ``Target``; the network backend
below it then connects only to a pinned address of that target, never resolving the name
again (DNS rebinding safe). httpcore still sees the host *name*, so the Host header, TLS
SNI and certificate verification use the name, not the address. A connection for an
origin that was not checked first is refused: nothing can bypass the guard.

Bodies are read with ``read_capped``: raw bytes are streamed and decoded here (gzip and
deflate only, with a hard cap on DECODED bytes, so a decompression bomb is stopped after
``limit`` bytes of output instead of filling memory).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from httpcore._backends.sync import SyncStream  # the stream SyncBackend itself returns

from producer.errors import NetworkBlocked, ResourceExhausted, UpstreamError
from workers.outbound.egress import EgressGuard, Target

__all__ = ["ACCEPT_ENCODING", "Body", "GuardedTransport", "read_capped"]

# Only what ``read_capped`` can decode with a bounded output; never br/zstd.
ACCEPT_ENCODING = "gzip, deflate"


class _PinnedBackend(httpcore.SyncBackend):
    def __init__(self, guard: EgressGuard) -> None:
        self.guard = guard
        self._targets: dict[tuple[str, int], Target] = {}
        self._lock = threading.Lock()

    def pin(self, target: Target) -> None:
        with self._lock:
            self._targets[(target.host, target.port)] = target

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        with self._lock:
            target = self._targets.get((host.lower().strip("[]"), port))
        if target is None:  # a connection the transport did not check: refuse, loudly
            raise NetworkBlocked(f"connection to {host}:{port} was not checked by the guard")
        try:
            sock = self.guard.connect(target, timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            sock.setsockopt(*option)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return SyncStream(sock)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection is checked and pinned by ``guard``."""

    def __init__(self, guard: EgressGuard, ssl_context: ssl.SSLContext | None = None) -> None:
        # trust_env=False: proxies from the environment would route around the guard.
        super().__init__(verify=ssl_context or True, trust_env=False, retries=0)
        self.guard = guard
        self._backend = _PinnedBackend(guard)
        # httpx has no public knob for the network backend; rebuild its pool with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=10,
            max_keepalive_connections=5,
            keepalive_expiry=5.0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=self._backend,
        )

    def check(self, url: httpx.URL) -> Target:
        target = self.guard.check_url(str(url))
        self._backend.pin(target)
        return target

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.check(request.url)
        return super().handle_request(request)


@dataclass(slots=True)
class Body:
    data: bytes
    wire_bytes: int
    truncated: bool


class _Decoder:
    def __init__(self, encoding: str) -> None:
        enc = encoding.strip().lower()
        if enc in ("", "identity"):
            self.z = None
        elif enc in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self.z = zlib.decompressobj(zlib.MAX_WBITS)  # zlib-wrapped, as RFC 9110 says
        else:
            raise UpstreamError(
                f"the server answered with content-encoding {encoding!r}, which the worker "
                f"does not decode; it was asked for {ACCEPT_ENCODING!r} only",
                retryable=False,
            )

    def feed(self, chunk: bytes, room: int) -> tuple[bytes, bool]:
        """At most ``room`` decoded bytes, and whether more output was left."""
        if self.z is None:
            return chunk[:room], len(chunk) > room
        try:
            out = self.z.decompress(chunk, room + 1)  # bounded output, whatever the ratio
        except zlib.error as exc:
            raise UpstreamError(f"the response body is not valid compressed data: {exc}") from None
        return out[:room], len(out) > room or bool(self.z.unconsumed_tail)


def read_capped(response: httpx.Response, limit: int, deadline: float) -> Body:
    """Stream the body: stop at ``limit`` decoded bytes or at ``deadline`` (monotonic).

    Over the limit, a plain body is cut and flagged; a compressed one is refused
    (``resource_exhausted``), since expanding past the cap is what a bomb does."""
    encoding = response.headers.get("content-encoding", "")
    decoder = _Decoder(encoding)
    parts: list[bytes] = []
    size = wire = 0
    truncated = False
    for chunk in response.iter_raw(64 * 1024):
        wire += len(chunk)
        out, more = decoder.feed(chunk, limit - size)
        parts.append(out)
        size += len(out)
        if more:
            truncated = True
            break
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the response body took longer than the action's timeout")
    if truncated and decoder.z is not None:
        raise ResourceExhausted(
            f"the response body decompresses to more than {limit} bytes "
            f"({wire} compressed bytes read); refused as a possible decompression bomb. "
            "Request a smaller resource or ask for a higher api.max_body_bytes",
            limit=limit,
        )
    return Body(b"".join(parts), wire, truncated)
