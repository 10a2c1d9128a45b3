"""The secret store: workers resolve secrets by name; agents only ever name them.

Two sources, read in this order (the first that has the name wins):

1. A directory (setting ``secrets_dir``), laid out like a mounted Kubernetes Secret: one
   file per secret whose content is the value (one trailing newline is dropped), plus an
   optional ``<name>.meta.json`` with the secret's allowed destinations::

       /run/secrets/actionfleet/github            ghp_xxx
       /run/secrets/actionfleet/github.meta.json  {"hosts": ["api.github.com"],
                                                   "schemes": ["https"], "ports": [443]}

2. Environment variables: ``ACTIONFLEET_SECRET_<NAME>`` holds the value and
   ``ACTIONFLEET_SECRET_<NAME>_HOSTS`` a comma-separated host list (``<NAME>`` is the
   secret name upper-cased, every character outside ``A-Z0-9`` replaced by ``_``).

A secret without allowed hosts can be sent nowhere: binding is mandatory, so a secret
meant for one API cannot be pointed at an agent-chosen URL (fail closed). ``hosts``
entries match exactly, or every subdomain with a ``*.`` prefix.

A vault backend implements the ``SecretStore`` protocol (``get``) and is chained in front.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from producer.errors import NotFound, ValidationError_

__all__ = [
    "ChainSecretStore",
    "DirSecretStore",
    "EnvSecretStore",
    "Secret",
    "SecretStore",
    "build_secret_store",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Secret:
    name: str
    value: str
    hosts: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()  # empty: any scheme the egress policy allows
    ports: tuple[int, ...] = ()  # empty: any port the egress policy allows

    def allows(self, scheme: str, host: str, port: int) -> bool:
        """May this secret be sent to ``scheme://host:port``?"""
        host = host.lower().rstrip(".")
        if self.schemes and scheme.lower() not in self.schemes:
            return False
        if self.ports and port not in self.ports:
            return False
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False

    def __repr__(self) -> str:  # never print the value, not even in a traceback
        return f"Secret(name={self.name!r}, hosts={self.hosts!r})"


class SecretStore(Protocol):
    def get(self, name: str) -> Secret | None:
        """The secret, or None when this store does not have it."""
        ...


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name.endswith(".meta.json"):
        raise ValidationError_(
            f"secret name {name!r} is not valid; use letters, digits, '.', '_' or '-' "
            "(at most 128 characters)",
            field="payload.auth.secret",
        )


def _meta(name: str, data: Mapping[str, object]) -> tuple[tuple[str, ...], ...]:
    def strs(key: str) -> tuple[str, ...]:
        raw = data.get(key) or []
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ValueError(f"secret {name!r}: {key} must be a list of strings")
        return tuple(x.strip().lower().rstrip(".") for x in raw if x.strip())

    return strs("hosts"), strs("schemes")


class DirSecretStore:
    """Files in a directory, as Kubernetes mounts a Secret (symlinks inside it are normal
    there, so they are followed; names can never leave the directory)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, name: str) -> Secret | None:
        _check_name(name)
        path = self.root / name
        try:
            raw = path.read_bytes()[: MAX_SECRET_BYTES + 1]
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if len(raw) > MAX_SECRET_BYTES:
            raise ValueError(f"secret {name!r} is larger than {MAX_SECRET_BYTES} bytes")
        value = raw.decode("utf-8").removesuffix("\n")
        meta_path = self.root / f"{name}.meta.json"
        try:
            data = json.loads(meta_path.read_text())
        except FileNotFoundError:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{meta_path} must hold a JSON object")
        hosts, schemes = _meta(name, data)
        ports_raw = data.get("ports") or []
        if not isinstance(ports_raw, list) or not all(isinstance(p, int) for p in ports_raw):
            raise ValueError(f"secret {name!r}: ports must be a list of integers")
        return Secret(name, value, hosts, schemes, tuple(ports_raw))


class EnvSecretStore:
    """``ACTIONFLEET_SECRET_<NAME>`` (value) and ``..._HOSTS`` (comma-separated hosts)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    @staticmethod
    def variable(name: str) -> str:
        return "ACTIONFLEET_SECRET_" + re.sub(r"[^A-Z0-9]", "_", name.upper())

    def get(self, name: str) -> Secret | None:
        _check_name(name)
        var = self.variable(name)
        value = self.environ.get(var)
        if value is None:
            return None
        hosts = tuple(
            h.strip().lower().rstrip(".")
            for h in self.environ.get(var + "_HOSTS", "").split(",")
            if h.strip()
        )
        return Secret(name, value, hosts)


class ChainSecretStore:
    def __init__(self, stores: Iterable[SecretStore]) -> None:
        self.stores = list(stores)

    def get(self, name: str) -> Secret | None:
        for store in self.stores:
            secret = store.get(name)
            if secret is not None:
                return secret
        return None

    def require(self, name: str, field: str = "payload.auth.secret") -> Secret:
        """The secret or ``not_found``, naming only the secret that was asked for."""
        secret = self.get(name)
        if secret is None:
            raise NotFound(
                f"no secret named {name!r} is available to this worker; ask the operator "
                "to provision it, or use the name of an existing secret",
                field=field,
                secret=name,
            )
        return secret


def build_secret_store(secrets_dir: Path | None) -> ChainSecretStore:
    stores: list[SecretStore] = []
    if secrets_dir is not None:
        stores.append(DirSecretStore(secrets_dir))
    stores.append(EnvSecretStore())
    return ChainSecretStore(stores)
