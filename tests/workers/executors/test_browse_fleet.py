"""Browse end to end: ActionClient -> Redis -> a real ``actions.browse`` Celery worker
subprocess -> its Chromium and egress proxy -> a real HTTP site on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.client import ActionClient
from tests.browse_fixtures import Site, require_chromium
from tests.conftest import RedisServer, Worker, start_worker


@pytest.fixture(scope="module")
def browse_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Worker, Path]]:
    require_chromium()
    url = redis_server.url(7)
    redis_server.client(7).flushdb()
    home = tmp_path_factory.mktemp("browse-fleet")
    workspaces = home / "ws"
    worker = start_worker(
        url,
        home,
        queues="actions.browse",
        concurrency=1,
        workspace_root=str(workspaces),
        secrets_dir=str(home / "secrets"),
    )
    yield url, worker, workspaces
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()


@pytest.fixture
def client(
    browse_worker: tuple[str, Worker, Path], make_client: Callable[[str], ActionClient]
) -> ActionClient:
    return make_client(browse_worker[0])


def _action(url: str, tenant: str = "browse-local", **payload: Any) -> dict[str, Any]:
    return {
        "primitive": "browse",
        "tenant_id": tenant,
        "agent_id": "researcher",
        "payload": {"url": url, **payload},
    }


def test_browse_through_a_worker(
    client: ActionClient, browse_worker: tuple[str, Worker, Path], site: Site
) -> None:
    _url, worker, workspaces = browse_worker
    result = client.run(
        _action(site.url("/"), extract=["title", "markdown", "links", "screenshot"]), timeout=90
    )
    assert result.status == "succeeded", result
    out = result.output or {}
    assert (out["title"], out["status"], result.worker) == ("Home", 200, worker.name)
    assert out["markdown"].startswith("# Welcome to the test site")
    assert site.url("/about") in [link["url"] for link in out["links"]]
    shot = out["screenshot"]
    data = (workspaces / "browse-local" / shot["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == shot["sha256"] and len(data) == shot["bytes"]


def test_refusals_and_a_hung_page_on_the_same_worker(
    client: ActionClient, browse_worker: tuple[str, Worker, Path], site: Site
) -> None:
    _url, worker, _ = browse_worker
    # The default profile refuses loopback destinations.
    denied = client.run(_action(site.url("/"), tenant="someone-else"), timeout=90)
    assert denied.status == "denied" and denied.error is not None
    assert denied.error.type == "network_blocked"
    assert denied.error.details["url"] == site.url("/")

    above = client.run(_action(site.url("/"), timeout_s=31), timeout=90)
    assert above.status == "denied" and above.error is not None
    assert above.error.type == "policy_denied" and above.error.details["limit"] == 30

    hung = client.run(_action(site.url("/hang"), timeout_s=2), timeout=90)
    assert hung.status == "timed_out", hung
    assert hung.error is not None and hung.error.type == "timeout"
    # The same single-process worker serves the next action.
    after = client.run(_action(site.url("/about"), extract=["title"]), timeout=90)
    assert after.status == "succeeded", after
    assert after.output is not None and after.output["title"] == "About"
    assert after.worker == hung.worker == worker.name
