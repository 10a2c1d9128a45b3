"""Authentication of a local fleet (``actionfleet up`` with ``ACTIONFLEET_AUTH=required``):
its Redis users and its operator key.

- ``redis_users``: an ACL file (0600) with the admin's and the workers' users and the
  default user off; returns the URLs each logs in with.
- ``make_operator_key``: a key for every tenant, agent and primitive, for the operator's
  own commands on this machine (kept in fleet.json, mode 0600), with its Redis user when
  the fleet made the users; returns what fleet.json records.
- ``revoke_operator_key``: at stop, so the key dies with the fleet even on a broker that
  outlives it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from producer.config import with_credentials
from workers.auth.acl import (
    ADMIN_USER,
    WORKER_USER,
    ServicePasswords,
    apply_producer_users,
    service_acl_lines,
)
from workers.auth.keys import KeyStore

__all__ = ["RedisUsers", "make_operator_key", "redis_users", "revoke_operator_key"]


@dataclass(frozen=True)
class RedisUsers:
    aclfile: Path
    admin_url: str
    worker_url: str


def redis_users(data: Path, url: str, write: Any) -> RedisUsers:
    """The ACL file in ``data`` (written with ``write(path, text)``, owner only) and the
    admin's and workers' URLs of the Redis at ``url``."""
    passwords = ServicePasswords()
    aclfile = (data / "users.acl").resolve()
    write(aclfile, "\n".join(service_acl_lines(passwords)) + "\n")
    return RedisUsers(
        aclfile,
        with_credentials(url, ADMIN_USER, passwords.admin),
        with_credentials(url, WORKER_USER, passwords.worker),
    )


def make_operator_key(url: str, with_acl: bool) -> tuple[str, dict[str, Any]]:
    """(key id, fleet.json's auth fields) of a new operator key in the Redis at ``url``."""
    client = redis.Redis.from_url(url)
    try:
        store = KeyStore(client)
        record, key = store.create(
            "*", "*", description=f"operator key of `actionfleet up` (pid {os.getpid()})"
        )
        if with_acl:  # our Redis, with ACL users: the key gets its own
            apply_producer_users(client, store.list())
    finally:
        client.close()
    info: dict[str, Any] = {
        "auth": "required",
        "operator_key": key.secret(),
        "operator_key_id": record.key_id,
    }
    if with_acl:
        # broker_url is the admin's (operator commands); a producer reading fleet.json
        # logs in as its key's ACL user instead (ActionClient, broker_auth "key").
        info |= {"admin_url": url, "broker_auth": "key", "redis_acl": True}
    return record.key_id, info


def revoke_operator_key(url: str, key_id: str) -> str | None:
    """Revoke the operator key; returns why it could not be, or None."""
    try:
        client = redis.Redis.from_url(url)
        try:
            KeyStore(client).revoke(key_id)
        finally:
            client.close()
    except (redis.RedisError, KeyError) as exc:
        return str(exc)
    return None
