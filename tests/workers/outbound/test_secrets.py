"""The secret store: directory (Kubernetes Secret mount) and environment sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.errors import NotFound, ValidationError_
from workers.outbound.secrets import (
    ChainSecretStore,
    DirSecretStore,
    EnvSecretStore,
    Secret,
    build_secret_store,
)


def test_dir_store_reads_value_and_binding(tmp_path: Path) -> None:
    (tmp_path / "github").write_text("ghp_value\n")
    (tmp_path / "github.meta.json").write_text(
        json.dumps({"hosts": ["api.github.com", "*.githubusercontent.com"], "schemes": ["https"]})
    )
    s = DirSecretStore(tmp_path).get("github")
    assert s is not None and s.value == "ghp_value"  # one trailing newline dropped
    assert s.allows("https", "api.github.com", 443)
    assert s.allows("https", "raw.githubusercontent.com", 443)
    assert not s.allows("http", "api.github.com", 80)  # scheme not allowed
    assert not s.allows("https", "api.github.com.evil.test", 443)
    assert not s.allows("https", "githubusercontent.com", 443)  # '*.' means subdomains
    assert "ghp_value" not in repr(s)


def test_kubernetes_style_symlinks_are_followed(tmp_path: Path) -> None:
    data = tmp_path / "..2026_11_21"
    data.mkdir()
    (data / "token").write_text("t0k3n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "token").symlink_to("..data/token")
    s = DirSecretStore(tmp_path).get("token")
    assert s is not None and s.value == "t0k3n"


def test_secret_without_binding_goes_nowhere(tmp_path: Path) -> None:
    (tmp_path / "loose").write_text("v")
    s = DirSecretStore(tmp_path).get("loose")
    assert s is not None and s.hosts == ()
    assert not s.allows("https", "example.com", 443)


def test_env_store_and_chain_order(tmp_path: Path) -> None:
    env = {
        "ACTIONFLEET_SECRET_SLACK_BOT": "xoxb-1",
        "ACTIONFLEET_SECRET_SLACK_BOT_HOSTS": "slack.com, hooks.slack.com",
        "ACTIONFLEET_SECRET_SHARED": "from-env",
    }
    (tmp_path / "shared").write_text("from-dir")
    chain = ChainSecretStore([DirSecretStore(tmp_path), EnvSecretStore(env)])
    slack = chain.get("slack-bot")
    assert slack == Secret("slack-bot", "xoxb-1", ("slack.com", "hooks.slack.com"))
    shared = chain.get("shared")
    assert shared is not None and shared.value == "from-dir"  # the directory wins


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "x.meta.json", ""])
def test_names_cannot_leave_the_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError_):
        DirSecretStore(tmp_path).get(name)


def test_unknown_secret_names_only_itself(tmp_path: Path) -> None:
    (tmp_path / "other-secret").write_text("x")
    store = build_secret_store(tmp_path)
    with pytest.raises(NotFound) as info:
        store.require("missing")
    assert "'missing'" in info.value.message and "other-secret" not in info.value.message
