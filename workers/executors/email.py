"""The ``email`` primitive: one message through the operator's SMTP relay, exactly once.

For one action: addresses and headers validated (CR/LF refused) -> recipients checked
against the tenant's ``email`` policy (fails closed; one recipient outside it refuses the
whole message) -> attachments read through ``workers/workspace/tenant.py`` (no absolute paths,
no ``..``, no symlinks) -> message rendered with a Message-ID derived from the idempotency
key -> dry run returns the rendering; otherwise the outbox is claimed, the relay (checked
by the egress guard's address rules, connected to the pinned address) gets the message,
and the outbox records the result that any redelivery replays.

The relay is operator configuration (``ACTIONFLEET_SMTP_*``), never agent input, so the
tenant's egress policy does not apply to it; only the address rules do, with loopback or
private relays allowed by ``smtp_allow_cidrs`` alone. The sender (``From``) is the
operator's ``smtp_from``: an agent cannot send as someone else.
"""

from __future__ import annotations

import hashlib
import mimetypes
import smtplib
import socket
import ssl
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from pathlib import Path
from typing import Any, ClassVar, Literal

from audit.redact import Scrubber
from producer.errors import (
    ActionError,
    Conflict,
    PolicyDenied,
    QuotaExceeded,
    UpstreamError,
    ValidationError_,
)
from producer.models import Action, EmailAction, EmailPayload
from workers.config import Settings
from workers.guarantees.outbox import Outbox
from workers.middleware import ActionContext
from workers.outbound.egress import EgressGuard, EgressPolicy, Target
from workers.outbound.secrets import ChainSecretStore
from workers.policy import EmailPolicy, Grant
from workers.workspace.tenant import Workspaces

__all__ = ["EmailExecutor", "RelayConfig", "message_id_for", "recipient_allowed"]


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str | None
    port: int = 587
    tls: Literal["none", "starttls", "tls"] = "starttls"
    secret: str | None = None
    sender: str = "actionfleet@localhost"
    allow_cidrs: tuple[str, ...] = ()
    ca_file: Path | None = None
    timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> RelayConfig:
        return cls(
            host=s.smtp_host,
            port=s.smtp_port,
            tls=s.smtp_tls,
            secret=s.smtp_secret,
            sender=s.smtp_from,
            allow_cidrs=tuple(c.strip() for c in s.smtp_allow_cidrs.split(",") if c.strip()),
            ca_file=s.smtp_ca_file,
            timeout_s=s.smtp_timeout_s,
        )


def message_id_for(tenant_id: str, idempotency_key: str, sender: str) -> str:
    """The same action always carries the same Message-ID (receivers can deduplicate)."""
    digest = hashlib.sha256(f"{tenant_id}\0{idempotency_key}".encode()).hexdigest()[:40]
    domain = sender.rsplit("@", 1)[-1] or "actionfleet.invalid"
    return f"<af-{digest}@{domain}>"


def recipient_allowed(address: str, policy: EmailPolicy) -> bool:
    addr = address.lower()
    domain = addr.rsplit("@", 1)[-1]
    if addr in (a.lower() for a in policy.allow_addresses):
        return True
    for pattern in (d.lower().rstrip(".") for d in policy.allow_domains):
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


# ------------------------------------------------------------------ pinned SMTP


class _Connect:
    _target: Target
    _host: str

    def connected(self) -> smtplib.SMTP:
        """Connect to the pinned target and say EHLO; returns self for ``with``."""
        assert isinstance(self, smtplib.SMTP)
        # smtplib keeps the host given to __init__ for STARTTLS SNI and verification.
        self._host = self._target.host
        self.connect(self._target.host, self._target.port)
        self.ehlo()
        return self


class _PinnedSMTP(_Connect, smtplib.SMTP):
    """smtplib connects by name itself; this connects to the guard's pinned address
    while ``self._host`` (used for STARTTLS SNI and verification) stays the name."""

    def __init__(self, guard: EgressGuard, target: Target, timeout: float) -> None:
        self._guard, self._target = guard, target
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._guard.connect(self._target, timeout)


class _PinnedSMTPSSL(_Connect, smtplib.SMTP_SSL):
    def __init__(
        self, guard: EgressGuard, target: Target, timeout: float, context: ssl.SSLContext
    ) -> None:
        self._guard, self._target = guard, target
        super().__init__(timeout=timeout, context=context)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._guard.connect(self._target, timeout)
        return self.context.wrap_socket(sock, server_hostname=host)


# ------------------------------------------------------------------ executor


def _address(value: str, field: str) -> str:
    try:
        addr = Address(addr_spec=value)
        addr.domain.encode("idna")
    except (ValueError, IndexError, UnicodeError) as exc:
        raise ValidationError_(
            f"{value!r} is not a valid email address ({exc}); use name@example.com",
            field=field,
        ) from None
    if not addr.username or not addr.domain or "." not in addr.domain:
        raise ValidationError_(
            f"{value!r} is not a valid email address; use name@example.com", field=field
        )
    return addr.addr_spec


def _no_crlf(value: str | None, field: str) -> None:
    if value is not None and any(c in value for c in "\r\n\0"):
        raise ValidationError_(
            f"{field} contains a line break or NUL, which could inject headers; "
            "send it on one line",
            field=field,
        )


class EmailExecutor:
    primitive: ClassVar[str] = "email"

    def __init__(
        self,
        relay: RelayConfig,
        secrets: ChainSecretStore,
        outbox: Outbox,
        workspaces: Workspaces,
    ) -> None:
        self.relay = relay
        self.secrets = secrets
        self.outbox = outbox
        self.workspaces = workspaces

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, EmailAction)
        registered: list[str] = ctx.extra.setdefault("secrets", [])
        p = action.payload
        policy = grant.tenant.email
        recipients = self._recipients(p)
        if len(recipients) > policy.max_recipients:
            raise PolicyDenied(
                f"{len(recipients)} recipients is above this tenant's limit of "
                f"{policy.max_recipients} per message; split the message",
                field="payload.to",
                asked=len(recipients),
                limit=policy.max_recipients,
            )
        denied = [r for r in recipients if not recipient_allowed(r, policy)]
        key = action.idempotency_key or action.action_id
        msg, attachments = self._render(action, key, policy)
        data = msg.as_bytes()
        if p.dry_run:
            return {
                "dry_run": True,
                "sent": False,
                "message_id": msg["Message-ID"],
                "headers": {k: str(v) for k, v in msg.items()},
                "size_bytes": len(data),
                "recipients": recipients,
                "attachments": attachments,
                "would_be_allowed": not denied,
                "denied_recipients": denied,
            }
        if denied:
            raise PolicyDenied(
                f"{len(denied)} recipient(s) are outside this tenant's allowed recipients "
                f"({', '.join(denied[:5])}); nothing was sent. Remove them or ask the "
                "operator to allow their domain",
                field="payload.to",
                denied=denied,
            )
        try:
            return self._deliver(action, key, msg, data, recipients, registered)
        except ActionError as exc:
            if registered:
                scrub = Scrubber(registered)
                exc.message = scrub(exc.message)
                exc.args = (exc.message,)
            raise

    # -- building ----------------------------------------------------------------------

    @staticmethod
    def _recipients(p: EmailPayload) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for field, values in (("to", p.to), ("cc", p.cc), ("bcc", p.bcc)):
            for i, v in enumerate(values):
                addr = _address(v, f"payload.{field}[{i}]")
                if addr.lower() not in seen:
                    seen.add(addr.lower())
                    out.append(addr)
        return out

    def _render(
        self, action: EmailAction, key: str, policy: EmailPolicy
    ) -> tuple[EmailMessage, list[dict[str, Any]]]:
        p = action.payload
        _no_crlf(p.subject, "payload.subject")
        msg = EmailMessage(policy=SMTP_POLICY)
        msg["From"] = self.relay.sender
        msg["To"] = ", ".join(_address(a, "payload.to") for a in p.to)
        if p.cc:
            msg["Cc"] = ", ".join(_address(a, "payload.cc") for a in p.cc)
        if p.reply_to:
            msg["Reply-To"] = _address(p.reply_to, "payload.reply_to")
        msg["Subject"] = p.subject
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = message_id_for(action.tenant_id, key, self.relay.sender)
        # Bcc stays out of the headers: it only exists in the envelope.
        if p.text is None and p.html is not None:
            msg.set_content(p.html, subtype="html")
        else:
            msg.set_content(p.text or "")
            if p.html is not None:
                msg.add_alternative(p.html, subtype="html")
        attached: list[dict[str, Any]] = []
        budget = policy.max_attachment_bytes
        workspace = self.workspaces.tenant(action.tenant_id)
        for i, rel in enumerate(p.attachments):
            field = f"payload.attachments[{i}]"
            try:
                # The workspace's descriptor walk refuses '..', absolute paths, symlinks.
                data = workspace.read(rel, max(budget, 0), field).data
            except QuotaExceeded as exc:
                raise PolicyDenied(
                    f"attachments exceed this tenant's limit of "
                    f"{policy.max_attachment_bytes} bytes (at {rel!r}); attach less or "
                    "link to the file instead",
                    field=field,
                    limit=policy.max_attachment_bytes,
                ) from exc
            budget -= len(data)
            ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
            maintype, subtype = ctype.split("/", 1)
            name = rel.rsplit("/", 1)[-1]
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
            attached.append({"path": rel, "bytes": len(data), "content_type": ctype})
        return msg, attached

    # -- sending -----------------------------------------------------------------------

    def _deliver(
        self,
        action: EmailAction,
        key: str,
        msg: EmailMessage,
        data: bytes,
        recipients: list[str],
        registered: list[str],
    ) -> dict[str, Any]:
        relay = self.relay
        if not relay.host:
            raise UpstreamError(
                "this fleet has no SMTP relay configured, so email cannot be sent; use "
                "dry_run, or ask the operator to set ACTIONFLEET_SMTP_HOST",
                retryable=False,
            )
        guard = EgressGuard(
            EgressPolicy(schemes=["smtp"], any_port=True, allow_cidrs=list(relay.allow_cidrs))
        )
        target = guard.check("smtp", relay.host, relay.port)
        login: tuple[str, str] | None = None
        if relay.secret:
            if relay.tls == "none":
                raise UpstreamError(
                    "the relay is configured with a secret but without TLS; the worker will "
                    "not send credentials in clear text. Ask the operator to set "
                    "ACTIONFLEET_SMTP_TLS to starttls or tls",
                    retryable=False,
                )
            secret = self.secrets.require(relay.secret, field="settings.smtp_secret")
            registered.append(secret.value)
            if not secret.allows("smtp", target.host, relay.port):
                raise PolicyDenied(
                    f"the SMTP secret {secret.name!r} is not bound to the relay host "
                    f"{target.host}; ask the operator to bind it",
                    retryable=False,
                )
            user, _, password = secret.value.partition(":")
            login = (user, password)

        message_id = str(msg["Message-ID"])
        claim = self.outbox.claim(action.tenant_id, key, message_id)
        if claim.state == "sent":
            return {**(claim.result or {}), "replayed": True}
        if claim.state == "sending":
            raise Conflict(
                "an earlier delivery of this email (same idempotency_key) started sending "
                "and did not record its outcome: it is either still running or its worker "
                "died while talking to the relay. It is not sent again, to never send it "
                "twice; check whether it arrived (Message-ID "
                f"{message_id}) and send with a new idempotency_key if it did not",
                retryable=False,
                message_id=message_id,
            )
        accepted_data = False
        try:
            with self._connect(guard, target) as smtp:
                if relay.tls == "starttls":
                    smtp.starttls(context=self._ssl())
                    smtp.ehlo()
                if login is not None:
                    smtp.login(*login)
                code, resp = smtp.mail(relay.sender)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, resp, relay.sender)
                refused: dict[str, tuple[int, bytes]] = {}
                for r in recipients:
                    code, resp = smtp.rcpt(r)
                    if code not in (250, 251):
                        refused[r] = (code, resp)
                if len(refused) == len(recipients):
                    raise smtplib.SMTPRecipientsRefused(refused)
                # From here the relay may have the message whatever happens next.
                accepted_data = True
                code, resp = smtp.data(data)
                if code != 250:
                    accepted_data = False  # a definite refusal: nothing was queued
                    raise smtplib.SMTPDataError(code, resp)
        except (smtplib.SMTPException, OSError) as exc:
            if not accepted_data:
                self.outbox.release(claim)
            raise self._smtp_error(exc, accepted_data, message_id) from None
        output = {
            "dry_run": False,
            "sent": True,
            "message_id": message_id,
            "relay": f"{target.host}:{target.port}",
            "recipients": recipients,
            "refused_recipients": sorted(refused),
            "size_bytes": len(data),
            "replayed": False,
        }
        self.outbox.complete(claim, output)
        return output

    def _connect(self, guard: EgressGuard, target: Target) -> smtplib.SMTP:
        if self.relay.tls == "tls":
            return _PinnedSMTPSSL(guard, target, self.relay.timeout_s, self._ssl()).connected()
        return _PinnedSMTP(guard, target, self.relay.timeout_s).connected()

    def _ssl(self) -> ssl.SSLContext:
        cafile = str(self.relay.ca_file) if self.relay.ca_file else None
        return ssl.create_default_context(cafile=cafile)

    @staticmethod
    def _smtp_error(exc: Exception, maybe_sent: bool, message_id: str) -> ActionError:
        if maybe_sent:
            return UpstreamError(
                f"the relay connection failed while the message was being handed over "
                f"({type(exc).__name__}); it may have been accepted, so it will not be sent "
                f"again under this idempotency_key. Check for Message-ID {message_id}",
                retryable=False,
                message_id=message_id,
            )
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return UpstreamError(
                f"the relay refused every recipient ({len(exc.recipients)}); check the addresses",
                retryable=False,
            )
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return UpstreamError(
                "the relay refused the worker's SMTP credentials; ask the operator to check "
                "the smtp_secret",
                retryable=False,
            )
        if isinstance(exc, smtplib.SMTPResponseException):
            return UpstreamError(
                f"the relay refused the message ({exc.smtp_code}); nothing was sent",
                retryable=400 <= exc.smtp_code < 500,
                smtp_code=exc.smtp_code,
            )
        return UpstreamError(
            f"could not talk to the SMTP relay ({type(exc).__name__}: {exc}); nothing was "
            "sent, retry later",
            retryable=True,
        )

    def close(self) -> None:
        self.outbox.close()
