"""The egress guard refuses before connecting. Every test here runs under the tripwire:
a socket connecting anywhere but loopback fails the test instead of sending a packet."""

from __future__ import annotations

import socket

import pytest

from producer.errors import NetworkBlocked
from workers.outbound.egress import (
    EgressGuard,
    EgressPolicy,
    StaticResolver,
    address_problem,
    parse_host,
)

pytestmark = pytest.mark.usefixtures("tripwire")

RESOLVER = StaticResolver(
    {
        "public.test": ["93.184.216.34"],
        "metadata.test": ["169.254.169.254"],
        "private.test": ["10.0.0.1"],
        "mixed.test": ["93.184.216.34", "192.168.1.1"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "local.test": ["127.0.0.1"],
    }
)


def guard(**policy: object) -> EgressGuard:
    return EgressGuard(EgressPolicy(**policy), RESOLVER)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost.localdomain.invalid/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[2002:7f00:1::]/",
        "http://[64:ff9b::a00:1]/",
        "http://[fe80::1%25eth0]/",
        "http://[fd00::1]/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://0/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://metadata.test/",
        "http://private.test/",
        "http://mixed.test/",
        "http://mapped.test/",
        "gopher://public.test/",
        "http://public.test:25/",
        "file:///etc/passwd",
    ],
)
def test_refused_before_any_connection(url: str) -> None:
    with pytest.raises(NetworkBlocked) as info:
        guard().check_url(url)
    assert info.value.type == "network_blocked"
    assert info.value.details["url"]


def test_public_host_is_pinned_to_checked_addresses() -> None:
    target = guard().check_url("https://public.test/x")
    assert (target.host, target.port, [str(a) for a in target.addresses]) == (
        "public.test",
        443,
        ["93.184.216.34"],
    )


def test_domain_lists() -> None:
    g = guard(allow_domains=["public.test"], deny_domains=["bad.public.test"])
    assert g.check_url("http://public.test/").host == "public.test"
    with pytest.raises(NetworkBlocked, match="deny list"):
        g.check_url("http://bad.public.test/")
    with pytest.raises(NetworkBlocked, match="allow list"):
        g.check_url("http://metadata.test/")
    with pytest.raises(NetworkBlocked, match="IP addresses"):
        g.check_url("http://93.184.216.34/")


def test_explicit_cidr_allows_loopback_only() -> None:
    g = guard(allow_cidrs=["127.0.0.0/8"])
    assert [str(a) for a in g.check_url("http://local.test/").addresses] == ["127.0.0.1"]
    (mapped,) = g.check_url("http://[::ffff:127.0.0.1]/").addresses
    assert mapped.ipv4_mapped is not None and str(mapped.ipv4_mapped) == "127.0.0.1"  # type: ignore[union-attr]
    with pytest.raises(NetworkBlocked):
        g.check_url("http://private.test/")


def test_connect_uses_the_pin_and_reaches_loopback() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    g = guard(allow_cidrs=["127.0.0.1/32"], any_port=True)
    target = g.check_url(f"http://local.test:{port}/")
    conn = g.connect(target, timeout=2)
    peer, _ = srv.accept()
    assert conn.getpeername() == ("127.0.0.1", port)
    for s in (conn, peer, srv):
        s.close()


def test_parse_and_classify() -> None:
    assert str(parse_host("2130706433")) == "127.0.0.1"
    assert parse_host("Example.COM.") == "example.com"
    assert address_problem(parse_host("8.8.8.8")) is None  # type: ignore[arg-type]
    assert address_problem(parse_host("169.254.169.254")) == "link-local (cloud metadata)"  # type: ignore[arg-type]


def test_the_tripwire_itself_refuses_without_sending(tripwire: list[str]) -> None:
    from tests.tripwire import TripwireError

    with socket.socket() as s, pytest.raises(TripwireError):
        s.connect(("10.0.0.1", 80))  # refused by the tripwire, never sent
    with pytest.raises(TripwireError):
        socket.create_connection(("169.254.169.254", 80), timeout=0.1)
    assert len(tripwire) == 2
    tripwire.clear()  # expected trips; the fixture fails the test on any other
