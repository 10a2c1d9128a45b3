"""The email primitive against a real aiosmtpd SMTP server on loopback and real Redis
(the outbox), in-process through the real pipeline and end to end through a worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from producer.client import ActionClient
from tests.conftest import TEST_POLICY, RedisServer, start_worker
from workers.executors.email import EmailExecutor, RelayConfig, message_id_for
from workers.guarantees.outbox import Outbox
from workers.middleware import ActionContext
from workers.ops.fleet import free_port
from workers.outbound.secrets import ChainSecretStore, EnvSecretStore
from workers.pipeline import Pipeline
from workers.policy import PolicyEngine
from workers.workspace.tenant import Workspaces

pytestmark = pytest.mark.usefixtures("tripwire")

TENANT = "apitest"  # tests/data/policy.yaml: recipients at example.com and *.example.org


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=email_policy.default)  # type: ignore[return-value]


@dataclass
class SmtpServer:
    port: int
    received: list[Received] = field(default_factory=list)
    # Set by a test to hold the "250 OK" after DATA until it says so (crash window).
    hold: threading.Event | None = None
    got_data: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
        )
        self.got_data.set()
        if self.hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hold.wait, 60)
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    port = free_port()
    state = SmtpServer(port)
    controller = Controller(state, hostname="127.0.0.1", port=port)
    controller.start()
    yield state
    if state.hold is not None:
        state.hold.set()
    controller.stop()


@pytest.fixture
def outbox(redis_server: RedisServer) -> Iterator[Outbox]:
    redis_server.client(12).flushdb()
    box = Outbox(redis_server.url(12))
    yield box
    box.close()


@pytest.fixture
def workspaces(tmp_path: Path) -> Workspaces:
    return Workspaces(tmp_path / "workspaces")


def make_executor(
    smtp: SmtpServer,
    outbox: Outbox,
    workspaces: Workspaces,
    env: dict[str, str] | None = None,
    **relay: Any,
) -> EmailExecutor:
    config = RelayConfig(
        host="127.0.0.1",
        port=smtp.port,
        tls="none",
        sender="agents@actionfleet.example",
        allow_cidrs=("127.0.0.0/8",),
    )
    for k, v in relay.items():
        object.__setattr__(config, k, v)
    return EmailExecutor(config, ChainSecretStore([EnvSecretStore(env or {})]), outbox, workspaces)


class _Registry:
    def __init__(self, executor: EmailExecutor) -> None:
        self.executor = executor

    def supports(self, primitive: str) -> bool:
        return primitive == "email"

    def get(self, primitive: str) -> EmailExecutor:
        return self.executor

    def close(self) -> None:
        pass


def email_action(tenant: str = TENANT, **payload: Any) -> dict[str, Any]:
    body = {"to": ["ops@example.com"], "subject": "Report", "text": "hello"} | payload
    return {
        "primitive": "email",
        "tenant_id": tenant,
        "agent_id": "tester",
        "action_id": str(uuid.uuid4()),
        "payload": body,
    }


def run(executor: EmailExecutor, raw: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    pipeline = Pipeline(PolicyEngine(TEST_POLICY), _Registry(executor), [])  # type: ignore[arg-type]
    return pipeline.run(ActionContext("email", "actions.email", "test@localhost", attempt, raw))


# ------------------------------------------------------------------ sending


def test_message_with_attachment_arrives_intact(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    blob = os.urandom(200_000)
    (workspaces.tenant_dir(TENANT) / "reports").mkdir()
    (workspaces.tenant_dir(TENANT) / "reports" / "q3.bin").write_bytes(blob)
    raw = email_action(
        to=["ops@example.com"],
        cc=["lead@team.example.org"],
        bcc=["audit@example.com"],
        subject="Q3 — résumé",
        html="<p>hello</p>",
        reply_to="replies@example.com",
        attachments=["reports/q3.bin"],
    )
    raw["idempotency_key"] = "report-q3"
    r = run(make_executor(smtp, outbox, workspaces), raw)
    assert r["status"] == "succeeded", r
    (got,) = smtp.received
    assert got.mail_from == "agents@actionfleet.example"
    assert sorted(got.rcpt_tos) == ["audit@example.com", "lead@team.example.org", "ops@example.com"]
    msg = got.message()
    assert msg["Subject"] == "Q3 — résumé"
    assert msg["Message-ID"] == message_id_for(TENANT, "report-q3", "agents@actionfleet.example")
    assert msg["Message-ID"] == r["output"]["message_id"]
    assert msg["Bcc"] is None  # envelope only
    assert msg["Reply-To"] == "replies@example.com"
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "q3.bin" and att.get_content() == blob
    assert msg.get_body(("plain",)).get_content().strip() == "hello"  # type: ignore[union-attr]
    assert msg.get_body(("html",)).get_content().strip() == "<p>hello</p>"  # type: ignore[union-attr]


def test_disallowed_recipient_refuses_the_whole_message(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    raw = email_action(to=["ops@example.com"], bcc=["someone@evil.example.net"])
    r = run(make_executor(smtp, outbox, workspaces), raw)
    assert r["status"] == "denied" and r["error"]["type"] == "policy_denied"
    assert r["error"]["details"]["denied"] == ["someone@evil.example.net"]
    assert smtp.received == []


def test_default_policy_allows_no_recipient(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    r = run(make_executor(smtp, outbox, workspaces), email_action(tenant="acme"))
    assert r["error"]["type"] == "policy_denied"
    assert smtp.received == []


def test_too_many_recipients_is_denied(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    raw = email_action(to=[f"u{i}@example.com" for i in range(6)])
    r = run(make_executor(smtp, outbox, workspaces), raw)
    assert r["error"]["type"] == "policy_denied" and r["error"]["details"]["limit"] == 5
    assert smtp.received == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"subject": "hi\r\nBcc: victim@evil.example.net"}, "payload.subject"),
        ({"subject": "hi\nX-Injected: 1"}, "payload.subject"),
        ({"attachments": ["../other-tenant/secret.txt"]}, "payload.attachments[0]"),
        ({"attachments": ["/etc/passwd"]}, "payload.attachments[0]"),
    ],
)
def test_injection_and_path_escapes_are_refused(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces, payload: dict, field: str
) -> None:
    r = run(make_executor(smtp, outbox, workspaces), email_action(**payload))
    assert r["status"] == "invalid", r
    assert r["error"]["details"]["field"] == field
    assert smtp.received == []


def test_symlinked_attachment_is_refused(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    (workspaces.tenant_dir(TENANT) / "link").symlink_to("/etc/hostname")
    r = run(make_executor(smtp, outbox, workspaces), email_action(attachments=["link"]))
    assert r["status"] in ("invalid", "failed") and r["error"]["type"] != "internal_error", r
    assert smtp.received == []


def test_dry_run_renders_without_sending(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    raw = email_action(to=["ops@example.com", "x@evil.example.net"], dry_run=True)
    r = run(make_executor(smtp, outbox, workspaces), raw)
    assert r["status"] == "succeeded", r
    out = r["output"]
    assert out["dry_run"] is True and out["sent"] is False
    assert out["headers"]["To"] == "ops@example.com, x@evil.example.net"
    assert out["headers"]["From"] == "agents@actionfleet.example"
    assert out["size_bytes"] > 100
    assert out["would_be_allowed"] is False
    assert out["denied_recipients"] == ["x@evil.example.net"]
    assert smtp.received == []


def test_same_action_twice_sends_once(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    executor = make_executor(smtp, outbox, workspaces)
    raw = email_action()
    first = run(executor, raw)
    second = run(executor, raw, attempt=2)
    assert first["status"] == second["status"] == "succeeded"
    assert len(smtp.received) == 1
    assert first["output"]["replayed"] is False and second["output"]["replayed"] is True
    assert second["output"]["message_id"] == first["output"]["message_id"]
    other = run(executor, email_action())  # another action: another message
    assert other["output"]["replayed"] is False and len(smtp.received) == 2


def test_loopback_relay_needs_explicit_configuration(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    r = run(make_executor(smtp, outbox, workspaces, allow_cidrs=()), email_action())
    assert r["error"]["type"] == "network_blocked"
    assert smtp.received == []
    # A refusal before the relay took the message frees the key: a fixed config can send.
    r = run(make_executor(smtp, outbox, workspaces), email_action())
    assert r["status"] == "succeeded"


def test_relay_down_is_retryable_and_frees_the_key(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    raw = email_action()
    r = run(make_executor(smtp, outbox, workspaces, port=free_port()), raw)
    assert r["error"]["type"] == "upstream_error" and r["error"]["retryable"] is True
    r = run(make_executor(smtp, outbox, workspaces), raw, attempt=2)
    assert r["status"] == "succeeded" and len(smtp.received) == 1


def test_credentials_are_never_sent_without_tls(
    smtp: SmtpServer, outbox: Outbox, workspaces: Workspaces
) -> None:
    executor = make_executor(smtp, outbox, workspaces, secret="relay")
    r = run(executor, email_action())
    assert r["error"]["type"] == "upstream_error" and "clear text" in r["error"]["message"]
    assert smtp.received == []


# ------------------------------------------------------------------ TLS and AUTH

RELAY_LOGIN = "bot:pa55word-never-logged"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_tls_relay_with_auth_from_the_secret_store(
    mode: str, cert: tuple[Path, Path], outbox: Outbox, workspaces: Workspaces
) -> None:
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any):
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=(data.login, data.password) == (b"bot", b"pa55word-never-logged"))

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*map(str, cert))
    port = free_port()
    state = SmtpServer(port)
    tls_kw: dict[str, Any] = (
        {"tls_context": ctx, "require_starttls": True}
        if mode == "starttls"
        else {"ssl_context": ctx}
    )
    controller = Controller(
        state,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_required=True,
        # aiosmtpd cannot tell that an implicit-TLS (ssl_context) session is encrypted.
        auth_require_tls=mode == "starttls",
        **tls_kw,
    )
    controller.start()
    try:
        env = {
            "ACTIONFLEET_SECRET_RELAY": RELAY_LOGIN,
            "ACTIONFLEET_SECRET_RELAY_HOSTS": "localhost",
        }
        executor = make_executor(
            state, outbox, workspaces, env, host="localhost", tls=mode, secret="relay",
            ca_file=cert[0], allow_cidrs=("127.0.0.0/8", "::1/128"),
        )  # fmt: skip
        r = run(executor, email_action())
        assert r["status"] == "succeeded", r["error"]
        assert logins == [(b"bot", b"pa55word-never-logged")]
        assert len(state.received) == 1
        # Without the CA the relay's certificate is not trusted: nothing is sent.
        untrusted = make_executor(
            state, outbox, workspaces, env, host="localhost", tls=mode, secret="relay",
            allow_cidrs=("127.0.0.0/8", "::1/128"),
        )  # fmt: skip
        r = run(untrusted, email_action())
        assert r["error"]["type"] == "upstream_error", r
        assert "pa55word" not in json.dumps(r)
        assert len(state.received) == 1 and len(logins) == 1
    finally:
        controller.stop()


# ------------------------------------------------------------------ end to end


def test_worker_sigkilled_after_the_relay_took_the_message_sends_once(
    smtp: SmtpServer,
    redis_server: RedisServer,
    make_client: Callable[[str], ActionClient],
    tmp_path: Path,
) -> None:
    """The pool process dies while the relay holds the message (the documented window):
    Celery redelivers the action, the outbox refuses to send it again, one message."""
    url = redis_server.url(14)
    redis_server.client(14).flushdb()
    smtp.hold = threading.Event()
    worker = start_worker(
        url,
        tmp_path / "w",
        queues="actions.email",
        concurrency=1,
        smtp_host="127.0.0.1",
        smtp_port=str(smtp.port),
        smtp_tls="none",
        smtp_allow_cidrs="127.0.0.0/8",
        lease_s="3",  # the pipeline's idempotency lease of the killed delivery lapses sooner
    )
    try:
        client = make_client(url)
        handle = client.submit(email_action())
        assert smtp.got_data.wait(60), worker.tail()
        (child,) = worker.pool_pids()
        subprocess.run(["kill", "-9", str(child)], check=True)
        smtp.hold.set()
        result = handle.result(timeout=90)
        assert result.status == "failed" and result.error is not None, result
        assert result.error.type == "conflict" and result.error.retryable is False
        assert result.error.details["message_id"] == smtp.received[0].message()["Message-ID"]
        time.sleep(1)  # nothing else arrives late
        assert len(smtp.received) == 1
        # Sent normally, then sent again with the same idempotency key (a new action id,
        # so the result backend cannot answer from the first run): replayed, not re-sent.
        action = email_action() | {"idempotency_key": "weekly-report-48"}
        first = client.run(action, timeout=60)
        again = client.run(action | {"action_id": str(uuid.uuid4())}, timeout=60)
        assert first.ok and again.ok and again.output is not None
        # Replayed by the outbox or by the pipeline's idempotency record: never re-sent.
        assert again.output["message_id"] == first.output["message_id"]
        assert len(smtp.received) == 2
        assert json.dumps(again.output["recipients"]) == '["ops@example.com"]'
    finally:
        worker.stop()
