"""The egress guard: the one place that decides whether an action may talk to a host.

Every primitive that leaves the worker (browse, api, email) goes through ``EgressGuard``:

1. ``check_url`` — the scheme allowlist, the tenant's domain lists (``reason="domain"``,
   with ``rule`` = ``allow_domains`` / ``deny_domains`` / ``ip_literal``; a name refused
   here is never resolved), then the port allowlist.
2. ``resolve`` — the host is resolved ONCE (IP literals in any encoding are normalized,
   e.g. ``2130706433``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``) and EVERY address is
   checked against the address rules; one bad address refuses the whole host, so a DNS
   answer mixing a public and a private address cannot be used to slip through.
3. ``connect`` — connects to one of the checked addresses (the pin). Nothing resolves the
   name again afterwards, so DNS rebinding between check and use is not possible.

Address rules: loopback, private (RFC 1918, ULA), link-local (incl. cloud metadata
169.254.169.254), CGNAT, multicast, reserved, unspecified, benchmarking, documentation,
and the IPv6 forms that embed an IPv4 address (IPv4-mapped, 6to4, NAT64, Teredo, which
are judged by the embedded address) are refused unless the policy allows them explicitly
(``allow_cidrs``, or ``allow_private`` for all of them).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from producer.errors import NetworkBlocked

__all__ = [
    "EgressGuard",
    "EgressPolicy",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "Target",
    "address_problem",
    "parse_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V4_BLOCKS: list[tuple[str, str]] = [
    ("0.0.0.0/8", "unspecified / 'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
]
_V6_BLOCKS: list[tuple[str, str]] = [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated private)"),
    ("ff00::/8", "multicast"),
]
_BLOCKS = [(ipaddress.ip_network(n), why) for n, why in _V4_BLOCKS + _V6_BLOCKS]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the mapping forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's (obfuscated-decoded) address
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def address_problem(ip: IPAddress) -> str | None:
    """Why this address is not a public destination, or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            problem = address_problem(inner)
            return f"{problem} (as {ip})" if problem else None
    for net, why in _BLOCKS:
        if ip.version == net.version and ip in net:
            return why
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_host(host: str) -> IPAddress | str:
    """An IP address if ``host`` is an IP literal in any encoding inet_aton accepts
    (decimal ``2130706433``, octal ``0177.0.0.1``, hex ``0x7f.1``), else the lowercased
    IDNA host name."""
    h = host.strip().rstrip(".").lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.split("%", 1)[0]  # a zone id does not change the address
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if h and all(part and _is_numberish(part) for part in h.split(".")):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            raise NetworkBlocked(
                f"host {host!r} looks like a malformed IP address", host=host
            ) from None
    try:
        return h.encode("idna").decode("ascii")
    except UnicodeError:
        raise NetworkBlocked(f"host {host!r} is not a valid host name", host=host) from None


def _is_numberish(part: str) -> bool:
    return part.isdigit() or (
        part.startswith("0x") and all(c in "0123456789abcdef" for c in part[2:])
    )


class EgressPolicy(BaseModel):
    """A tenant's outbound traffic rules (the ``egress`` section of the policy file)."""

    model_config = ConfigDict(extra="forbid")

    allow_domains: list[str] = Field(
        default_factory=list,
        description="if set, only these domains (and their subdomains); '*.x.com' = subdomains",
    )
    deny_domains: list[str] = Field(default_factory=list, description="always refused")
    allow_cidrs: list[str] = Field(
        default_factory=list, description="address ranges allowed even if private/loopback"
    )
    allow_private: bool = Field(False, description="allow every non-public address (unsafe)")
    schemes: list[str] = Field(default_factory=lambda: ["http", "https"])
    ports: list[int] = Field(default_factory=lambda: [80, 443, 8080, 8443])
    any_port: bool = Field(False, description="ignore the port allowlist")

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)
        return v

    @field_validator("allow_domains", "deny_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        return [d.strip().rstrip(".").lower() for d in v if d.strip()]


def _domain_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern or host.endswith("." + pattern)


class Resolver(Protocol):
    def resolve(self, host: str, port: int) -> list[IPAddress]: ...


class SystemResolver:
    """The machine's resolver (getaddrinfo)."""

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen: dict[str, IPAddress] = {}
        for *_, sockaddr in infos:
            seen.setdefault(str(sockaddr[0]), ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
        return list(seen.values())


class StaticResolver:
    """A resolver from a fixed table, for tests and for pinning names in deployments.
    Names not in the table fail to resolve (never fall through to real DNS)."""

    def __init__(self, table: dict[str, Iterable[str]]) -> None:
        self.table = {k.lower(): [ipaddress.ip_address(a) for a in v] for k, v in table.items()}

    def resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return list(self.table[host.lower()])
        except KeyError:
            raise OSError(f"{host}: name not known") from None


@dataclass(frozen=True, slots=True)
class Target:
    """A checked destination: connect only to ``addresses`` (the pin), never re-resolve."""

    scheme: str
    host: str  # normalized host name or IP literal, for Host/SNI
    port: int
    addresses: tuple[IPAddress, ...]


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "smtp": 25, "smtps": 465}


class EgressGuard:
    """Checks and pins destinations for one tenant's policy. Thread-safe (stateless)."""

    def __init__(self, policy: EgressPolicy, resolver: Resolver | None = None) -> None:
        self.policy = policy
        self.resolver = resolver or SystemResolver()
        self._allowed_nets = [ipaddress.ip_network(c, strict=False) for c in policy.allow_cidrs]

    # -- checks ------------------------------------------------------------------------

    def check_url(self, url: str) -> Target:
        """Check scheme, port, domain and every resolved address of ``url``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise NetworkBlocked(f"URL {url!r} is malformed: {exc}", url=url) from None
        scheme = parts.scheme.lower()
        if not parts.hostname:
            raise NetworkBlocked(f"URL {url!r} has no host", url=url)
        return self.check(scheme, parts.hostname, port or _DEFAULT_PORTS.get(scheme, 0), url=url)

    def check(self, scheme: str, host: str, port: int, *, url: str | None = None) -> Target:
        """Scheme, then the domain lists (a name refused by them is never resolved), then
        the port, then every address. An IP literal is judged by the address rules before
        the domain lists, so a page that names a private address outright is refused as
        an address (``reason="address"``), not merely as an unlisted host."""
        where = url or f"{scheme}://{host}:{port}"
        if scheme not in self.policy.schemes:
            raise NetworkBlocked(
                f"scheme {scheme!r} is not allowed ({where}); allowed: "
                f"{', '.join(self.policy.schemes)}",
                url=where,
                reason="scheme",
            )
        parsed = parse_host(host)
        if isinstance(parsed, str):
            self._check_domain(parsed, where)
        self._check_port(port, where)
        if isinstance(parsed, str):
            addresses = self._resolve(parsed, port, where)
            name = parsed
        else:
            name = str(parsed)
            self._check_address(parsed, where, name)
            if self.policy.allow_domains and not self._address_allowed_explicitly(parsed):
                raise NetworkBlocked(
                    f"{where}: IP addresses are not allowed when the policy lists domains",
                    url=where,
                    host=name,
                    reason="domain",
                    rule="ip_literal",
                )
            addresses = [parsed]
        for ip in addresses:
            self._check_address(ip, where, name)
        return Target(scheme, name, port, tuple(addresses))

    def _check_port(self, port: int, where: str) -> None:
        if not self.policy.any_port and port not in self.policy.ports:
            raise NetworkBlocked(
                f"port {port} is not allowed ({where}); allowed: "
                f"{', '.join(map(str, self.policy.ports))}",
                url=where,
                reason="port",
            )

    def _check_domain(self, host: str, where: str) -> None:
        if any(_domain_matches(host, d) for d in self.policy.deny_domains):
            raise NetworkBlocked(
                f"{host} is on the tenant's deny list",
                url=where,
                host=host,
                reason="domain",
                rule="deny_domains",
            )
        allow = self.policy.allow_domains
        if allow and not any(_domain_matches(host, d) for d in allow):
            raise NetworkBlocked(
                f"{host} is not on the tenant's allow list ({', '.join(allow)})",
                url=where,
                host=host,
                reason="domain",
                rule="allow_domains",
            )

    def _resolve(self, host: str, port: int, where: str) -> list[IPAddress]:
        try:
            addresses = self.resolver.resolve(host, port)
        except OSError as exc:
            raise NetworkBlocked(
                f"{host} does not resolve: {exc}",
                url=where,
                host=host,
                reason="dns",
                retryable=True,
            ) from None
        if not addresses:
            raise NetworkBlocked(
                f"{host} resolved to no address", url=where, host=host, reason="dns"
            )
        return addresses

    def _address_allowed_explicitly(self, ip: IPAddress) -> bool:
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_v4(ip)) is not None:
            candidates.append(inner)
        return any(
            c.version == n.version and c in n for c in candidates for n in self._allowed_nets
        )

    def _check_address(self, ip: IPAddress, where: str, host: str) -> None:
        problem = address_problem(ip)
        if problem is None or self.policy.allow_private or self._address_allowed_explicitly(ip):
            return
        raise NetworkBlocked(
            f"{where}: {host} is {ip}, a {problem} address; the tenant's policy does not allow it",
            url=where,
            host=host,
            address=str(ip),
            reason="address",
        )

    # -- connecting --------------------------------------------------------------------

    def connect(
        self,
        target: Target,
        timeout: float | None = None,
        connector: Callable[[tuple[str, int], float | None], socket.socket] | None = None,
    ) -> socket.socket:
        """Connect to the first reachable pinned address of an already checked target."""
        dial = connector or (lambda addr, t: socket.create_connection(addr, timeout=t))
        last: OSError | None = None
        for ip in target.addresses:
            try:
                return dial((str(ip), target.port), timeout)
            except OSError as exc:
                last = exc
        raise last or OSError(f"no address to connect to for {target.host}")
