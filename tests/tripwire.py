"""A tripwire for tests that name non-loopback addresses: any socket connection to a
destination outside 127.0.0.0/8 and ::1 raises and fails the test instead of connecting.

Loaded as a plugin by conftest; a module opts in with
``pytestmark = pytest.mark.usefixtures("tripwire")``. Or call
``install()``/``uninstall()`` around code in a process you control."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_create_connection = socket.create_connection
tripped: list[str] = []


class TripwireError(AssertionError):
    pass


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths stay on this machine
    host = str(address[0]).split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _guard(address: Any) -> None:
    if not _loopback(address):
        tripped.append(repr(address))
        raise TripwireError(f"tripwire: a socket tried to reach {address!r} (not loopback)")


def _connect(self: socket.socket, address: Any) -> None:
    _guard(address)
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _guard(address)
    return _real_connect_ex(self, address)


def _create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    _guard(address)
    return _real_create_connection(address, *args, **kwargs)


def install() -> None:
    socket.socket.connect = _connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
    socket.create_connection = _create_connection  # type: ignore[assignment]


def uninstall() -> None:
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    socket.create_connection = _real_create_connection  # type: ignore[assignment]


@pytest.fixture
def tripwire() -> Iterator[list[str]]:
    tripped.clear()
    install()
    try:
        yield tripped
    finally:
        uninstall()
    assert not tripped, f"tripwire: non-loopback connection attempts: {tripped}"
