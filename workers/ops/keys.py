"""``actionfleet keys``: create, list, rotate and revoke producer keys.

A key's secret is printed once, by ``create`` and ``rotate``, and never stored: the fleet
keeps its public key (``workers.auth.keys``). The commands reach the fleet's Redis at
``ACTIONFLEET_ADMIN_URL`` (default: the fleet of this home, or the broker).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from producer.cli_io import print_json as _print
from producer.errors import FleetUnavailable
from producer.models import PRIMITIVES
from workers.config import get_settings

__all__ = ["add_keys_parser", "parse_duration"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``7d``."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"a duration like 30m, 1h or 7d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _store() -> Any:
    import redis

    from workers.auth.keys import KeyStore

    url = get_settings().resolved_admin_url()
    if not url:
        raise FleetUnavailable(
            "no fleet Redis configured: set ACTIONFLEET_ADMIN_URL (or ACTIONFLEET_BROKER_URL), "
            "or start a fleet with `actionfleet up` in this home"
        )
    return KeyStore(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5))


def _shown_once(secret: str) -> None:
    print(
        "the key's secret is shown once, above; the fleet keeps only its public key. Give it "
        "to the producer as ACTIONFLEET_KEY (or ActionClient(key=...)).",
        file=sys.stderr,
    )


def _sync_acl(store: Any, quiet: bool = False) -> dict[str, int] | None:
    """Bring the producers' Redis users in line with the keys, when this Redis enforces
    ACLs and we are its admin (``up``'s fleet, or ACTIONFLEET_ADMIN_URL as af-admin)."""
    import redis

    from workers.auth.acl import ADMIN_USER, apply_producer_users

    try:
        whoami = store.client.execute_command("ACL WHOAMI")
    except redis.ResponseError:  # a user without even that right: certainly not the admin
        whoami = b""
    if (whoami.decode() if isinstance(whoami, bytes) else whoami) != ADMIN_USER:
        if not quiet:
            print(
                f"note: not connected as {ADMIN_USER}: Redis ACL users left as they are "
                "(docs/security.md)",
                file=sys.stderr,
            )
        return None
    return apply_producer_users(store.client, store.list())


def _cmd_keys(args: argparse.Namespace) -> int:
    store = _store()
    try:
        if args.keys_cmd == "acl":
            from workers.auth.acl import producer_rules

            if args.print:
                for r in store.list():
                    if r.usable():
                        print(f"user p-{r.key_id} " + " ".join(producer_rules(r)[1:]))
                return 0
            synced = _sync_acl(store)
            _print(synced or {"users": 0, "removed": 0, "managed": False})
            return 0 if synced is not None else 1
        try:
            return _change(store, args)
        finally:
            if args.keys_cmd in ("create", "rotate", "revoke"):
                _sync_acl(store, quiet=True)
    finally:
        store.client.close()


def _change(store: Any, args: argparse.Namespace) -> int:
    if args.keys_cmd == "create":
        primitives = [p for p in args.primitives.split(",") if p.strip()]
        try:
            record, key = store.create(args.tenant, args.agent, primitives, args.description)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _print({**record.public(), "secret": key.secret()})
        _shown_once(key.secret())
        return 0
    if args.keys_cmd == "list":
        records = store.list()
        if not args.all:
            records = [r for r in records if r.usable()]
        _print([r.public() for r in records])
        return 0
    if args.keys_cmd == "rotate":
        try:
            new, key, old = store.rotate(args.key_id, args.grace)
        except (KeyError, ValueError) as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 1
        _print({**new.public(), "secret": key.secret(), "replaces": old.public()})
        _shown_once(key.secret())
        return 0
    try:
        record = store.revoke(args.key_id)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    _print(record.public())
    return 0


def add_keys_parser(subparsers: Any) -> None:
    """Register ``actionfleet keys ...`` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "keys",
        help="producer keys: create, list, rotate, revoke",
        description="Producer keys say who sends an action: each action is signed with one "
        "and refused unless its tenant, agent and primitive are in the key's scope. The "
        "secret is printed once; the fleet keeps the public key only (docs/security.md).",
    )
    sub = p.add_subparsers(dest="keys_cmd", required=True, metavar="SUBCOMMAND")
    c = sub.add_parser("create", help="a new key; prints its secret once")
    c.add_argument("--tenant", required=True, help="tenant it acts for ('*': every tenant)")
    c.add_argument("--agent", default="*", help="agent id or pattern, e.g. 'researcher-*' (*)")
    c.add_argument(
        "--primitives",
        default=",".join(PRIMITIVES),
        help=f"comma-separated primitives it may use (default: all: {','.join(PRIMITIVES)})",
    )
    c.add_argument("--description", default="", help="a note for `keys list`")
    lst = sub.add_parser("list", help="keys and their state (never secrets)")
    lst.add_argument("--all", action="store_true", help="include revoked and expired keys")
    r = sub.add_parser(
        "rotate",
        help="a new key of the same scope; the old one keeps working for --grace",
        description="Rotation without downtime: hand the new secret to the producer within "
        "the grace period; actions signed with the old key are refused after it.",
    )
    r.add_argument("key_id", help="the key to replace")
    r.add_argument(
        "--grace",
        type=parse_duration,
        default=3600.0,
        help="how long the old key still works (30m, 1h, 7d; default 1h)",
    )
    v = sub.add_parser("revoke", help="refuse the key's actions from now on")
    v.add_argument("key_id")
    a = sub.add_parser(
        "acl",
        help="make the producers' Redis ACL users match the keys (or --print them)",
        description="Each usable key gets a Redis user that may only push to the action "
        "queues and read its tenant's results; revoked and expired keys lose theirs. "
        "create, rotate and revoke do this by themselves when connected as af-admin.",
    )
    a.add_argument("--print", action="store_true", help="print ACL file lines instead")
    p.set_defaults(func=_cmd_keys)
