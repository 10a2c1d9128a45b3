"""A governed fleet for the rules and approval tests: a real redis-server (append-only, so
it can be restarted), one real worker serving files, api, email and code (code through
the reliability probe, so runs can be counted), a loopback SMTP server, a loopback
webhook receiver, signed actions (authentication on), and the policy file of
docs/policy.md's examples written with the webhook's port."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from producer.auth import ProducerKey
from producer.client import ActionClient
from tests.audit_fixtures import stream_rows
from tests.conftest import ROOT, RedisServer, Worker, start_redis, start_worker, worker_env
from tests.workers.executors.test_email import SmtpServer
from workers.auth.keys import KeyStore
from workers.config import Settings
from workers.ops.fleet import free_port

RULES = """
@id("diagnose-read-only")
@description("diagnosis agents only read: files read, list and stat, and api GET")
forbid (principal, action, resource)
when { principal.id like "diagnose-*" }
unless {
  action in [Action::"files:read", Action::"files:list", Action::"files:stat", Action::"api:GET"]
};

@id("external-email")
@outcome("approval")
@description("email to anyone outside acme.com needs a human's approval")
forbid (principal, action == Action::"email:send", resource)
unless { ["acme.com"].containsAll(resource.domains) };

@id("no-report-deletes")
@description("nothing under reports/ is ever deleted")
forbid (principal, action == Action::"files:delete", resource)
when { resource.path == "reports" || resource.path like "reports/*" };

@id("code-rw-builders")
@outcome("approval")
@description("code that may write the workspace needs approval unless a builder runs it")
forbid (principal, action in Action::"code", resource)
when { resource.workspace == "rw" }
unless { principal in Group::"builders" };

@id("hurry")
@outcome("approval")
@timeout("2s")
@description("agents named hurry-* wait two seconds for an approval at most")
forbid (principal, action in Action::"code", resource)
when { principal.id like "hurry-*" };
"""


def policy_yaml(webhook_port: int) -> str:
    return json.dumps(
        {
            "version": 1,
            "default": {
                "egress": {"allow_cidrs": ["127.0.0.0/8"], "any_port": True},
                "email": {"allow_domains": ["acme.com", "partner.org"]},
            },
            "rules": {
                "groups": {"builders": ["builder-*"]},
                "cedar": RULES,
                "approvals": {
                    "timeout_s": 600,
                    "webhook": {
                        "url": f"http://127.0.0.1:{webhook_port}/hook",
                        "egress": {"allow_cidrs": ["127.0.0.0/8"], "any_port": True},
                    },
                },
            },
        }
    )  # JSON is YAML


@dataclass
class Webhook:
    port: int
    bodies: list[dict[str, Any]] = field(default_factory=list)
    got: threading.Event = field(default_factory=threading.Event)


def _webhook_handler(state: Webhook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            state.bodies.append(json.loads(body))
            state.got.set()
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def webhook_server() -> tuple[Webhook, ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = Webhook(int(httpd.server_address[1]))
    httpd.RequestHandlerClass = _webhook_handler(state)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return state, httpd


@dataclass
class GovFleet:
    redis: RedisServer
    home: Path
    policy: Path
    key: ProducerKey
    webhook: Webhook
    probe_dir: Path
    smtp: SmtpServer
    worker: Worker | None = None
    extra: dict[str, str] = field(default_factory=dict)
    clients: list[ActionClient] = field(default_factory=list)
    stops: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.redis.url()

    @property
    def workspace(self) -> Path:
        return self.home / "ws"

    def start(self, **overrides: str) -> Worker:
        """The fleet's worker; ``overrides`` replace any of its settings (e.g.
        ``test_probe_executor="0"`` for real executors)."""
        settings = (
            {
                "queues": "actions.files,actions.api,actions.email,actions.code",
                "concurrency": 2,
                "policy": str(self.policy),
                "auth": "required",
                "workspace_root": str(self.workspace),
                "test_probe_executor": "1",
                "test_probe_dir": str(self.probe_dir),
                "approval_sweep_s": "0.3",
                "smtp_host": "127.0.0.1",
                "smtp_port": str(self.smtp.port),
                "smtp_tls": "none",
                "smtp_allow_cidrs": "127.0.0.0/8",
            }
            | self.extra
            | overrides
        )
        self.worker = start_worker(self.url, self.home, **settings)  # type: ignore[arg-type]
        return self.worker

    def close(self) -> None:
        for c in self.clients:
            c.close()
        gc.collect()  # handles unsubscribe on collection: while Redis still answers
        if self.worker is not None:
            self.worker.stop()
        self.redis.proc.terminate()
        self.redis.proc.wait(10)
        for stop in self.stops:
            stop()

    def client(self) -> ActionClient:
        c = ActionClient(self.url, settings=Settings(broker_url=self.url), key=self.key)
        self.clients.append(c)
        return c

    def env(self) -> dict[str, str]:
        return worker_env(self.url, self.home, policy=str(self.policy))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``actionfleet <args>`` as an operator runs it, against this fleet."""
        return subprocess.run(
            [sys.executable, "-m", "workers.ops.cli", *args],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_json(self, *args: str) -> tuple[int, Any]:
        out = self.cli(*args)
        try:
            return out.returncode, json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"not JSON from {args}: {out.stdout!r} {out.stderr!r}") from None

    def audit_rows(self, action_id: str) -> list[dict[str, Any]]:
        return stream_rows(self.url, action_id)


def make_fleet(tmp: Path, **extra: str) -> GovFleet:
    server = start_redis(tmp / "redis", appendonly=True)
    webhook, _ = webhook_server()
    policy = tmp / "policy.yaml"
    policy.write_text(policy_yaml(webhook.port))
    client = server.client()
    try:
        _, key = KeyStore(client).create("*", "*", description="governance tests")
    finally:
        client.close()
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    smtp = SmtpServer(free_port())
    controller = Controller(smtp, hostname="127.0.0.1", port=smtp.port)
    controller.start()
    fleet = GovFleet(server, tmp / "home", policy, key, webhook, probe_dir, smtp, extra=extra)
    fleet.stops.append(controller.stop)
    return fleet


@pytest.fixture(scope="module")
def gov_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GovFleet]:
    fleet = make_fleet(tmp_path_factory.mktemp("gov"))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()
