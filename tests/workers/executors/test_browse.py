"""The browse executor in-process: real Chromium, real egress proxy, a real HTTP site on
loopback. Extraction, multi-step flows, isolation between actions, timeouts, limits,
browser death and logged-in sessions. (Egress refusals: tests/workers/browser/test_browse_egress.py;
through a real worker: tests/workers/executors/test_browse_fleet.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from producer.errors import ActionTimeout, PolicyDenied, ResourceExhausted, ValidationError_
from tests.browse_fixtures import (
    LOCAL_EGRESS,
    Site,
    browse_action,
    run,
    run_error,
    tenant_policy,
)
from workers.middleware import ActionContext


def test_extracts_text_markdown_links_html_and_screenshot(browse_executor: Any, site: Site) -> None:
    action = browse_action(
        site.url("/"),
        extract=["text", "markdown", "links", "title", "html", "screenshot"],
        viewport={"width": 640, "height": 480},
    )
    out = run(browse_executor, action)
    assert (out["url"], out["status"], out["title"]) == (site.url("/"), 200, "Home")
    assert "three pages" in out["text"] and "footer text" in out["text"]
    md = out["markdown"]
    assert md.startswith("# Welcome to the test site")
    assert f"[contact form]({site.url('/form')})" in md
    assert "- first point\n- second point" in md
    assert "footer text" not in md and "Home | About" not in md  # page chrome dropped
    urls = [link["url"] for link in out["links"]]
    assert urls == [site.url("/"), site.url("/about"), site.url("/form")]
    assert {"url": site.url("/form"), "text": "contact form"} in out["links"]
    assert "<main>" in out["html"] and out["truncated"] == []

    shot = out["screenshot"]
    assert shot["path"] == f".artifacts/{action.action_id}/screenshot.png"
    file = browse_executor.test_root / "workspaces" / "t1" / shot["path"]
    data = file.read_bytes()
    assert shot["bytes"] == len(data) and shot["sha256"] == hashlib.sha256(data).hexdigest()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR: the viewport asked for
    assert (width, height) == (640, 480)
    assert "screenshot" not in json.dumps({k: v for k, v in out.items() if k != "screenshot"})


def test_multi_step_form_flow(browse_executor: Any, site: Site) -> None:
    steps = [
        {"action": "click", "selector": "#to-form"},
        {"action": "wait_for", "selector": "#name"},
        {"action": "fill", "selector": "#name", "value": "Ada <Lovelace>"},
        {"action": "select", "selector": "#color", "value": "green"},
        {"action": "check", "selector": "#agree"},
        {"action": "click", "selector": "#send"},
        {"action": "wait_for", "text": "Hello, Ada"},
    ]
    out = run(browse_executor, browse_action(site.url("/"), steps=steps, extract=["text"]))
    assert out["title"] == "Result" and out["status"] == 200
    assert out["url"].startswith(site.url("/result?"))
    assert "Hello, Ada <Lovelace>" in out["text"]
    assert "color=green agree=on" in out["text"]
    assert out["steps_done"] == len(steps)


def _read_state(executor: Any, site: Site, tenant: str, steps: list[dict[str, Any]]) -> str:
    action = browse_action(site.url("/set-state"), tenant=tenant, steps=steps, extract=["text"])
    return str(run(executor, action)["text"])


def test_cookies_and_storage_never_survive_into_the_next_action(
    browse_executor: Any, site: Site
) -> None:
    read = [{"action": "goto", "url": site.url("/read-state")}]
    # Control: within ONE action the state is visible, so the reads below can fail.
    inside = _read_state(browse_executor, site, "t1", read)
    assert "storage=from-storage" in inside
    assert "jscookie=from-js" in inside and "srv=from-header" in inside

    for tenant in ("t1", "t2"):  # the same tenant, then another, on the same browser
        action = browse_action(site.url("/read-state"), tenant=tenant, extract=["text"])
        text = run(browse_executor, action)["text"]
        assert "cookie= storage=null" in text, (tenant, text)
        assert "server-cookie=[]" in text, (tenant, text)


def test_websocket_through_the_proxy_tunnel(browse_executor: Any, site: Site) -> None:
    # Chromium tunnels ws:// through the proxy with CONNECT: the spliced tunnel works.
    steps = [{"action": "wait_for", "text": "ws-hello", "timeout_s": 10}]
    out = run(browse_executor, browse_action(site.url("/ws-page"), steps=steps, extract=["text"]))
    assert "ws-hello" in out["text"]


def test_page_that_never_loads_times_out_and_the_next_action_runs(
    browse_executor: Any, site: Site
) -> None:
    started = time.monotonic()
    err = run_error(browse_executor, browse_action(site.url("/hang"), timeout_s=1.5))
    assert isinstance(err, ActionTimeout) and err.status == "timed_out"
    assert err.details["timeout_s"] == 1.5
    assert err.output is not None and err.output["url"] == site.url("/hang")
    assert time.monotonic() - started < 30  # not held to the test site's 120 s hang
    out = run(browse_executor, browse_action(site.url("/about"), extract=["title"]))
    assert out["title"] == "About"


def test_step_that_never_matches_reports_the_step(browse_executor: Any, site: Site) -> None:
    steps = [{"action": "click", "selector": "#does-not-exist", "timeout_s": 0.5}]
    err = run_error(browse_executor, browse_action(site.url("/"), steps=steps))
    assert isinstance(err, ActionTimeout)
    assert err.details["step"] == 0 and err.details["field"] == "payload.steps[0]"
    assert "#does-not-exist" in err.message


def test_step_without_required_field_is_invalid_before_browsing(browse_executor: Any) -> None:
    # Port 9 on loopback: nothing listens; a validation error must come before any load.
    action = browse_action("http://127.0.0.1:9/", steps=[{"action": "fill", "selector": "#q"}])
    err = run_error(browse_executor, action)
    assert isinstance(err, ValidationError_) and err.status == "invalid"
    assert err.details["field"] == "payload.steps[0].value"


def test_http_error_is_upstream_error_with_the_page(browse_executor: Any, site: Site) -> None:
    err = run_error(browse_executor, browse_action(site.url("/status/404")))
    assert err.type == "upstream_error" and err.retryable is False
    assert err.details["status"] == 404
    assert err.output["title"] == "Status 404"
    err5 = run_error(browse_executor, browse_action(site.url("/status/503")))
    assert err5.type == "upstream_error" and err5.retryable is True


def test_connection_refused_is_upstream_error(browse_executor: Any) -> None:
    err = run_error(browse_executor, browse_action("http://127.0.0.1:9/"))
    assert err.type == "upstream_error"
    assert err.details["url"] == "http://127.0.0.1:9/"


def test_oversized_page_is_resource_exhausted(browse_executor: Any, site: Site) -> None:
    policy = tenant_policy(egress=LOCAL_EGRESS, browse={"max_page_bytes": 256 * 1024})
    err = run_error(browse_executor, browse_action(site.url("/big?bytes=2000000")), policy)
    assert isinstance(err, ResourceExhausted)
    assert err.details["limit"] == 256 * 1024
    ok = run(browse_executor, browse_action(site.url("/big?bytes=1000")), policy)
    assert ok["status"] == 200 and ok["bytes_received"] > 1000


def test_extract_and_screenshot_caps(browse_executor: Any, site: Site) -> None:
    policy = tenant_policy(
        egress=LOCAL_EGRESS, browse={"max_extract_chars": 1024, "max_screenshot_bytes": 1024}
    )
    out = run(browse_executor, browse_action(site.url("/big?bytes=5000")), policy)
    assert len(out["text"]) == 1024 and out["truncated"] == ["text"]
    err = run_error(browse_executor, browse_action(site.url("/"), extract=["screenshot"]), policy)
    assert isinstance(err, ResourceExhausted) and err.details["limit"] == 1024


def _browser_pids() -> list[int]:
    """Chromium main processes started by this test process (children of its driver)."""
    me, found = os.getpid(), []
    parents: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    for pid, cmd in cmdlines.items():
        if "--remote-debugging-pipe" not in cmd or "--type=" in cmd:
            continue
        p = pid
        while p > 1 and p != me:
            p = parents.get(p, 1)
        if p == me:
            found.append(pid)
    return found


def test_a_dead_browser_is_replaced_for_the_next_action(browse_executor: Any, site: Site) -> None:
    run(browse_executor, browse_action(site.url("/about"), extract=["title"]))
    launches = browse_executor.manager.launches
    pids = _browser_pids()
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids[0] in _browser_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = run(browse_executor, browse_action(site.url("/about"), extract=["title"]))
    assert out["title"] == "About"
    assert browse_executor.manager.launches == launches + 1
    assert _browser_pids() not in ([], pids)


def test_executor_is_safe_from_several_threads(browse_executor: Any, site: Site) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths = ["/", "/about", "/form", "/about"]
    with ThreadPoolExecutor(4) as pool:
        titles = list(
            pool.map(
                lambda p: run(browse_executor, browse_action(site.url(p), extract=["title"]))[
                    "title"
                ],
                paths,
            )
        )
    assert titles == ["Home", "About", "Contact", "About"]


def test_logged_in_session_is_loaded_and_registered_for_redaction(
    browse_executor: Any, site: Site
) -> None:
    secrets: Path = browse_executor.test_root / "secrets"
    state = {
        "cookies": [
            {
                "name": "session",
                "value": "s3cr3t-cookie",
                "domain": "127.0.0.1",
                "path": "/",
                "expires": -1,
                "httpOnly": True,
                "secure": False,
                "sameSite": "Lax",
            },
            {  # another site's cookie in the same file is never loaded
                "name": "other",
                "value": "not-for-this-site",
                "domain": "elsewhere.test",
                "path": "/",
                "expires": -1,
                "httpOnly": False,
                "secure": False,
                "sameSite": "Lax",
            },
        ],
        "origins": [
            {
                "origin": site.url("/").rstrip("/"),
                "localStorage": [{"name": "remember", "value": "s3cr3t-storage"}],
            }
        ],
    }
    (secrets / "site-login").write_text(json.dumps(state))
    (secrets / "site-login.meta.json").write_text(json.dumps({"hosts": ["127.0.0.1"]}))
    ctx = ActionContext(primitive="browse", queue="actions.browse", worker="t", attempt=1, raw={})
    action = browse_action(site.url("/read-state"), session="site-login", extract=["text"])
    text = run(browse_executor, action, ctx=ctx)["text"]
    assert "server-cookie=[session=s3cr3t-cookie]" in text
    assert "storage=s3cr3t-storage" in text and "not-for-this-site" not in text
    assert {"s3cr3t-cookie", "s3cr3t-storage"} <= set(ctx.extra["secrets"])

    # The next action without the session starts clean.
    after = run(browse_executor, browse_action(site.url("/read-state"), extract=["text"]))
    assert "server-cookie=[]" in after["text"] and "storage=null" in after["text"]

    # A session is only offered to its own hosts.
    (secrets / "other-login").write_text(json.dumps(state))
    (secrets / "other-login.meta.json").write_text(json.dumps({"hosts": ["example.com"]}))
    err = run_error(browse_executor, browse_action(site.url("/"), session="other-login"))
    assert isinstance(err, PolicyDenied) and err.details["field"] == "payload.session"
    missing = run_error(browse_executor, browse_action(site.url("/"), session="nope"))
    assert missing.type == "not_found"


@pytest.mark.parametrize("timeout_s", [31.0])
def test_timeout_above_the_tenant_ceiling_is_denied(timeout_s: float) -> None:
    from tests.conftest import TEST_POLICY
    from workers.policy import PolicyEngine

    engine = PolicyEngine(TEST_POLICY)
    action = browse_action("http://127.0.0.1:9/", tenant="browse-local", timeout_s=timeout_s)
    with pytest.raises(PolicyDenied) as info:
        engine.authorize(action)
    assert info.value.details["limit"] == 30
    ok = browse_action("http://127.0.0.1:9/", tenant="browse-local", timeout_s=30)
    assert engine.authorize(ok).tenant.browse.max_timeout_s == 30
