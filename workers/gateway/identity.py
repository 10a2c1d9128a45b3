"""Who an MCP client is: a tenant, an agent and the producer key that signs for them.

Over stdio the server acts for the one key it was started with (``ACTIONFLEET_KEY``) and
the tenant and agent given on its command line. Over HTTP every request carries its own
producer key as a bearer token: the key must be one the fleet made, usable, and its scope
must name one tenant (and one agent, or the client picks one inside the key's pattern
with ``X-ActionFleet-Agent``). The model never chooses either: the tools have no such
arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from producer.auth import ProducerKey
from workers.auth.keys import KeyStore

__all__ = ["AGENT_HEADER", "Caller", "Refused", "caller_from_bearer"]

AGENT_HEADER = "x-actionfleet-agent"
_WILDCARDS = set("*?[")


class Refused(Exception):
    """The client is not let in; ``str()`` says why (never echoing the key)."""


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    agent_id: str
    key: ProducerKey

    @property
    def key_id(self) -> str:
        return self.key.key_id


def caller_from_bearer(
    authorization: str | None, store: KeyStore, agent: str | None = None
) -> Caller:
    """The caller of an HTTP request from its ``Authorization: Bearer afk1_…`` header."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Refused("no producer key: send Authorization: Bearer <key from actionfleet keys>")
    try:
        key = ProducerKey.parse(authorization[7:].strip())
    except ValueError as exc:
        raise Refused(str(exc)) from None
    record = store.get(key.key_id)
    if record is None or record.public_key != key.public_key_b64():
        raise Refused("unknown producer key for this fleet")
    if not record.usable():
        raise Refused(f"producer key {key.key_id} is {record.state()}")
    if _WILDCARDS & set(record.tenant):
        raise Refused(
            f"producer key {key.key_id} covers tenants {record.tenant!r}: the MCP server "
            "needs a key made for one tenant"
        )
    chosen = agent or record.agent
    if _WILDCARDS & set(chosen) or not fnmatchcase(chosen, record.agent):
        raise Refused(
            "say which agent you are with the X-ActionFleet-Agent header, one that the key's "
            f"agents {record.agent!r} cover"
        )
    return Caller(record.tenant, chosen, key)
