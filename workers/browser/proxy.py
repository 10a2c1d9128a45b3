"""The browser's egress proxy: every request Chromium makes goes through here.

Each browse action gets its own ``ProxySession``: a listening socket on 127.0.0.1 that
only that action's browser context uses (Playwright per-context proxy), so the port says
which action, and therefore which tenant policy, a request belongs to. No credentials, no
shared state between actions.

For every request the session asks the tenant's ``EgressGuard`` (scheme, port, domain,
every resolved address) and connects to the *pinned* address the guard checked; the name
is never resolved again, so DNS rebinding cannot swap the address between check and use.
Chromium never resolves names itself while a proxy is set, and loopback is proxied too
(Playwright adds ``<-loopback>`` to the bypass list), so there is no path around it.

Two request forms, as an HTTP forward proxy sees them:

* ``CONNECT host:port`` — https and websockets (Chromium tunnels ws:// too). Checked as
  scheme ``https``; the tunnel is then spliced both ways.
* ``GET http://host:port/path`` — plain http. Exactly ONE request is forwarded per client
  connection (``Connection: close`` upstream, the client socket closed after the response):
  Chromium reuses proxy connections across origins, so forwarding further bytes from the
  same client connection would send a second request past the check.

The session counts bytes received from upstream and cuts every connection when the
action's page budget is spent (``resource_exhausted``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from producer.errors import NetworkBlocked
from workers.browser.proxy_http import (
    HOP_HEADERS,
    parse_head,
    read_head,
    reply,
    split_authority,
)
from workers.outbound.egress import EgressGuard, Target

__all__ = ["ProxySession", "RequestRecord"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One refused or failed request, as the action reports it."""

    url: str
    reason: str  # the guard's reason (address, domain, scheme, port, dns) or "upstream"
    message: str
    address: str | None = None
    host: str = ""
    port: int = 0
    # Which domain rule refused it (allow_domains, deny_domains, ip_literal), if one did.
    rule: str = ""


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_in: int = 0
    requests: int = 0
    blocked: list[RequestRecord] = field(default_factory=list)
    failed: list[RequestRecord] = field(default_factory=list)
    refused: int = 0  # every refusal, also those past max_records
    over_budget: bool = False


class ProxySession:
    """A forward proxy for one action. ``start()`` → ``server`` URL → ``close()``."""

    def __init__(self, guard: EgressGuard, *, max_bytes: int, max_records: int = 50) -> None:
        self.guard = guard
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.stats = _Stats()
        # Called (from a proxy thread) the moment the page budget is spent, so the
        # action can stop at once instead of waiting for the browser to give up.
        self.on_over_budget: Callable[[], None] | None = None
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="egress-proxy", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ProxySession:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and cut every open connection (a hung upstream included)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._cut_all()
        self._thread.join(timeout=2)

    def __enter__(self) -> ProxySession:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- what the action reports -------------------------------------------------------

    @property
    def blocked(self) -> list[RequestRecord]:
        with self.stats.lock:
            return list(self.stats.blocked)

    @property
    def failed(self) -> list[RequestRecord]:
        with self.stats.lock:
            return list(self.stats.failed)

    @property
    def refused(self) -> int:
        """How many requests the guard refused (the lists above keep ``max_records``)."""
        return self.stats.refused

    @property
    def over_budget(self) -> bool:
        return self.stats.over_budget

    @property
    def bytes_in(self) -> int:
        return self.stats.bytes_in

    # -- internals ---------------------------------------------------------------------

    def _track(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _cut_all(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._closed.is_set():
                client.close()
                return
            self._track(client)
            threading.Thread(
                target=self._serve, args=(client,), name="egress-proxy-conn", daemon=True
            ).start()

    def _record(self, kind: str, rec: RequestRecord) -> None:
        with self.stats.lock:
            if kind == "blocked":
                self.stats.refused += 1
            target = self.stats.blocked if kind == "blocked" else self.stats.failed
            if len(target) < self.max_records:
                target.append(rec)

    def _count(self, n: int) -> bool:
        """Count upstream bytes; False once the action's budget is spent."""
        with self.stats.lock:
            self.stats.bytes_in += n
            first = self.stats.bytes_in > self.max_bytes and not self.stats.over_budget
            if first:
                self.stats.over_budget = True
        if first and self.on_over_budget is not None:
            self.on_over_budget()
        if self.stats.over_budget:
            self._cut_all()
            return False
        return True

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(IDLE_TIMEOUT_S)
            head, rest = read_head(client)
            if head is None:
                return
            method, target, version, headers = parse_head(head)
            with self.stats.lock:
                self.stats.requests += 1
            if method == b"CONNECT":
                upstream = self._open_connect(client, target.decode("latin-1"))
                if upstream is None:
                    return
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                self._splice(client, upstream)
            else:
                upstream = self._forward_http(client, method, target, version, headers, rest)
        except (OSError, ValueError) as exc:
            log.debug("proxy connection ended: %s", exc)
        finally:
            if upstream is not None:
                self._untrack(upstream)
            self._untrack(client)

    def _check(
        self,
        client: socket.socket,
        url: str,
        host: str,
        port: int,
        check: Callable[[], Target],
    ) -> Target | None:
        """Run a guard check; on refusal record it and answer 403 (nothing was sent)."""
        try:
            return check()
        except NetworkBlocked as exc:
            details = exc.details
            reason = str(details.get("reason", "blocked"))
            rec = RequestRecord(
                url,
                reason,
                exc.message,
                details.get("address"),
                host=str(details.get("host") or host).lower(),
                port=port,
                rule=str(details.get("rule") or ""),
            )
            if reason == "dns":
                # A name that does not resolve is a dead link, not a policy refusal.
                self._record("failed", rec)
                reply(client, 502, "name does not resolve")
            else:
                self._record("blocked", rec)
                reply(client, 403, "refused by the tenant's egress policy")
            return None

    def _connect(self, client: socket.socket, url: str, target: Target) -> socket.socket | None:
        try:
            upstream = self.guard.connect(target, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self._record("failed", RequestRecord(url, "upstream", f"connect failed: {exc}"))
            reply(client, 502, "upstream connection failed")
            return None
        self._track(upstream)
        upstream.settimeout(IDLE_TIMEOUT_S)
        return upstream

    def _open_connect(self, client: socket.socket, authority: str) -> socket.socket | None:
        host, port = split_authority(authority)
        url = f"https://{authority}"
        target = self._check(
            client, url, host, port, lambda: self.guard.check("https", host, port, url=url)
        )
        return None if target is None else self._connect(client, url, target)

    def _forward_http(
        self,
        client: socket.socket,
        method: bytes,
        raw_target: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        rest: bytes,
    ) -> socket.socket | None:
        url = raw_target.decode("latin-1")
        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError:
            port = 0  # the guard refuses the malformed URL below
        if parts.scheme.lower() != "http" or not parts.hostname:
            # Only absolute http:// URIs; anything else is not a proxy request.
            self._record("blocked", RequestRecord(url, "scheme", f"not a proxy request: {url}"))
            reply(client, 400, "absolute http:// URI expected")
            return None
        target = self._check(client, url, parts.hostname, port, lambda: self.guard.check_url(url))
        if target is None:
            return None
        upstream = self._connect(client, url, target)
        if upstream is None:
            return None
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        out = [method + b" " + path.encode("latin-1") + b" " + version]
        length = 0
        for name, value in headers:
            low = name.lower()
            if low in HOP_HEADERS:
                continue
            if low == b"transfer-encoding":
                reply(client, 501, "chunked request bodies are not supported by the proxy")
                return upstream
            if low == b"content-length":
                length = int(value.strip())
            out.append(name + b": " + value)
        out.append(b"Connection: close")
        upstream.sendall(b"\r\n".join(out) + b"\r\n\r\n")
        body = rest[:length]
        if body:
            upstream.sendall(body)
        remaining = length - len(body)
        while remaining > 0:
            chunk = client.recv(min(_CHUNK, remaining))
            if not chunk:
                return upstream
            upstream.sendall(chunk)
            remaining -= len(chunk)
        # Response: stream upstream -> client until upstream closes; never read further
        # requests from this client connection (see the module docstring).
        while True:
            data = upstream.recv(_CHUNK)
            if not data or not self._count(len(data)):
                return upstream
            client.sendall(data)

    def _splice(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy both ways until either side closes."""

        def pump(src: socket.socket, dst: socket.socket, counted: bool) -> None:
            try:
                while True:
                    data = src.recv(_CHUNK)
                    if not data or (counted and not self._count(len(data))):
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        up = threading.Thread(
            target=pump, args=(client, upstream, False), name="egress-proxy-up", daemon=True
        )
        up.start()
        pump(upstream, client, True)
        up.join(timeout=IDLE_TIMEOUT_S)
