"""Redis ACL users: what each party may do on the fleet's Redis.

- ``af-admin``: the operator (``actionfleet up``'s own commands, ``keys``, ``status``):
  everything.
- ``af-worker``: workers, the audit ingester, metrics and Flower: every command but the
  administrative and destructive ones (no ACL, CONFIG, FLUSHALL, FLUSHDB, SHUTDOWN…).
- ``p-<key id>``, one per usable producer key: push to the action queues (``LPUSH`` on
  ``actions.*``), read its tenant's results (``GET``/``MGET`` of, and ``SUBSCRIBE`` to,
  ``celery-task-meta-<tenant>+*``), nothing else: no pop from a queue, no other key, no
  other tenant's result, no admin command. Its password is derived from the key's secret
  (``producer.auth``); Redis keeps its SHA-256 only.

What an ACL cannot say, and how it is closed instead: a producer may push any message
onto any action queue, including one naming another tenant. The worker refuses it unless
it is signed by a key whose scope covers that tenant (``workers.auth.verify``), and
refuses a message sent under another action's result key (``workers.pipeline``).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterable

import redis

from producer.auth import redis_user
from producer.transport import RESULT_KEY_PREFIX
from workers.auth.keys import KeyRecord

__all__ = [
    "ADMIN_USER",
    "PRODUCER_COMMANDS",
    "WORKER_USER",
    "ServicePasswords",
    "apply_producer_users",
    "producer_rules",
    "service_acl_lines",
]

ADMIN_USER = "af-admin"
WORKER_USER = "af-worker"
# What ActionClient sends: publish (LPUSH, inside MULTI/EXEC), wait for its result
# (SUBSCRIBE, GET; MGET for a batch's, every key still checked against the patterns), and
# the connection's own PING and SELECT.
PRODUCER_COMMANDS = (
    "ping",
    "select",
    "lpush",
    "multi",
    "exec",
    "get",
    "mget",
    "subscribe",
    "unsubscribe",
)
_WORKER_RULES = "~* &* +@all -@admin -@dangerous +info +client|setname +client|getname +client|id"


def _sha(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


class ServicePasswords:
    """The admin's and the workers' passwords of a fleet (made by ``actionfleet up``)."""

    def __init__(self, admin: str | None = None, worker: str | None = None) -> None:
        self.admin = admin or secrets.token_urlsafe(32)
        self.worker = worker or secrets.token_urlsafe(32)


def service_acl_lines(passwords: ServicePasswords) -> list[str]:
    """The ACL file's lines for the default, admin and worker users."""
    return [
        "user default off resetkeys resetchannels -@all",
        f"user {ADMIN_USER} on #{_sha(passwords.admin)} ~* &* +@all",
        f"user {WORKER_USER} on #{_sha(passwords.worker)} {_WORKER_RULES}",
    ]


def producer_rules(record: KeyRecord) -> list[str]:
    """``ACL SETUSER`` rules of a producer key's user."""
    results = f"{RESULT_KEY_PREFIX}{record.tenant}+*"
    return [
        "reset",
        "on",
        f"#{record.redis_password_sha256}",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in PRODUCER_COMMANDS),
        "~actions.*",
        f"%R~{results}",
        f"&{results}",
    ]


def apply_producer_users(admin: redis.Redis, records: Iterable[KeyRecord]) -> dict[str, int]:
    """Make the Redis users match the keys: one per usable key, none for a revoked or
    expired one (its connections are closed), then ``ACL SAVE`` when Redis has an ACL
    file. Needs the admin user."""
    wanted = {redis_user(r.key_id): r for r in records if r.usable()}
    users = admin.execute_command("ACL USERS")
    existing = {u.decode() if isinstance(u, bytes) else u for u in users}
    for name, record in wanted.items():
        admin.execute_command("ACL SETUSER", name, *producer_rules(record))
    stale = sorted(u for u in existing if u.startswith("p-") and u not in wanted)
    if stale:
        admin.execute_command("ACL DELUSER", *stale)
    # No ACL file (users from the config file or set at run time): nothing to save.
    with contextlib.suppress(redis.ResponseError):
        admin.execute_command("ACL SAVE")
    return {"users": len(wanted), "removed": len(stale)}
