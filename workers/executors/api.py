"""The ``api`` primitive: one HTTP request, with secrets injected by the worker.

Order of business for one action (docs/api-email.md has the reasoning):
timeout ceiling -> secret resolved and registered for redaction -> secret bound to the
first URL's host -> request through ``GuardedTransport`` (egress guard + address pinning
on every hop) -> redirects followed here (never by httpx) with the secret stripped on a
hop its binding does not cover -> retries with backoff when safe to repeat -> body read
with a decoded-size cap -> output with allowlisted headers, secrets scrubbed everywhere.
"""

from __future__ import annotations

import json
import random
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx

from audit.redact import Scrubber
from producer.errors import (
    ActionError,
    ActionTimeout,
    PolicyDenied,
    RateLimited,
    UpstreamError,
    ValidationError_,
)
from producer.models import Action, ApiAction, ApiPayload
from workers.executors.api_http import (
    CREDENTIAL_HEADERS,
    IDEMPOTENCY_HEADER,
    RESPONSE_HEADERS,
    checked_headers,
    decode_body,
    header_get,
    header_pop,
    idempotency_header_value,
    inject_secret,
    port_of,
    retry_after_s,
    scrubbed_error,
)
from workers.middleware import ActionContext
from workers.outbound.egress import EgressGuard, Resolver
from workers.outbound.http import ACCEPT_ENCODING, Body, GuardedTransport, read_capped
from workers.outbound.secrets import ChainSecretStore, Secret
from workers.policy import ApiPolicy, Grant

# idempotency_header_value is re-exported: callers and tests import it from here.
__all__ = ["ApiExecutor", "idempotency_header_value"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 10.0


@dataclass(slots=True)
class _Plan:
    """Everything fixed for the action; each attempt replays it from the first URL."""

    method: str
    url: httpx.URL
    headers: dict[str, str]
    content: bytes | None
    secret: Secret | None
    scheme: str
    name: str | None
    deadline: float
    safe_to_repeat: bool
    policy: ApiPolicy
    scrub: Scrubber
    guard: EgressGuard
    redirects: list[str] = field(default_factory=list)
    auth_stripped: bool = False
    transport: GuardedTransport | None = None


class _Retry(Exception):
    def __init__(self, error: ActionError, wait: float | None = None) -> None:
        self.error = error
        self.wait = wait


class ApiExecutor:
    primitive: ClassVar[str] = "api"

    def __init__(
        self,
        secrets: ChainSecretStore,
        resolver: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.secrets = secrets
        self.resolver = resolver
        # Built once: loading the CA bundle costs milliseconds per action otherwise.
        self.ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)

    def execute(self, action: Action, grant: Grant, ctx: ActionContext) -> dict[str, Any]:
        assert isinstance(action, ApiAction)
        registered: list[str] = ctx.extra.setdefault("secrets", [])
        try:
            guard = EgressGuard(grant.tenant.egress, self.resolver)
            plan = self._plan(action, grant, guard, registered)
            transport = plan.transport = GuardedTransport(guard, self.ssl_context)
            with httpx.Client(
                transport=transport, follow_redirects=False, trust_env=False
            ) as client:
                return self._run(client, plan)
        except ActionError as exc:
            raise scrubbed_error(exc, Scrubber(registered)) from None

    # -- planning ----------------------------------------------------------------------

    def _plan(
        self, action: ApiAction, grant: Grant, guard: EgressGuard, registered: list[str]
    ) -> _Plan:
        p: ApiPayload = action.payload
        pol = grant.tenant.api
        timeout = p.timeout_s if p.timeout_s is not None else pol.default_timeout_s
        if timeout > pol.max_timeout_s:
            raise PolicyDenied(
                f"timeout_s {timeout:g}s is above this tenant's limit of "
                f"{pol.max_timeout_s:g}s; ask for at most {pol.max_timeout_s:g}s",
                field="payload.timeout_s",
                asked=timeout,
                limit=pol.max_timeout_s,
            )
        deadline = time.monotonic() + timeout
        if action.deadline is not None:
            left = (action.deadline - datetime.now(UTC)).total_seconds()
            deadline = min(deadline, time.monotonic() + max(0.0, left))

        secret: Secret | None = None
        if p.auth is not None:
            secret = self.secrets.require(p.auth.secret)
            registered.append(secret.value)  # the audit trail redacts it from here on
            if p.auth.scheme in ("header", "query") and not p.auth.name:
                raise ValidationError_(
                    f"auth scheme {p.auth.scheme!r} needs auth.name (the header or query "
                    "parameter to put the secret in)",
                    field="payload.auth.name",
                )
            if p.auth.scheme == "header" and p.auth.name:
                try:  # the same name rules as the agent's own headers
                    checked_headers({p.auth.name: ""})
                except ValidationError_ as exc:
                    raise ValidationError_(exc.message, field="payload.auth.name") from None
        headers = checked_headers(p.headers)
        try:
            url = httpx.URL(p.url)
            if p.query:
                url = url.copy_merge_params(p.query)
        except (httpx.InvalidURL, ValueError) as exc:
            guard.check_url(p.url)  # e.g. an octal IP httpx refuses: say network_blocked
            raise ValidationError_(
                f"payload.url is not a valid URL: {exc}", field="payload.url"
            ) from None
        if secret is not None and not secret.allows(url.scheme, url.host, port_of(url)):
            raise PolicyDenied(
                f"secret {secret.name!r} is not bound to {url.scheme}://{url.host}:{port_of(url)}; "
                "use a URL on a host the secret is bound to, or ask the operator to bind it",
                field="payload.auth.secret",
                host=url.host,
            )

        method = p.method
        if method in ("POST", "PATCH"):
            key = header_get(headers, IDEMPOTENCY_HEADER)
            if key == "":  # an explicit empty value: the agent opts out for this action
                header_pop(headers, IDEMPOTENCY_HEADER)
            elif key is None and pol.send_idempotency_key:
                headers[IDEMPOTENCY_HEADER] = idempotency_header_value(
                    action.tenant_id, action.idempotency_key or action.action_id
                )
        safe = method in SAFE_METHODS or bool(header_get(headers, IDEMPOTENCY_HEADER))

        content: bytes | None = None
        if p.json_ is not None and p.body is not None:
            raise ValidationError_(
                "send either payload.json or payload.body, not both", field="payload.body"
            )
        if p.json_ is not None:
            content = json.dumps(p.json_, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json")
        elif p.body is not None:
            content = p.body.encode()
        return _Plan(
            method=method,
            url=url,
            headers=headers,
            content=content,
            secret=secret,
            scheme=p.auth.scheme if p.auth else "bearer",
            name=p.auth.name if p.auth else None,
            deadline=deadline,
            safe_to_repeat=safe,
            policy=pol,
            scrub=Scrubber(registered),
            guard=guard,
        )

    # -- running -----------------------------------------------------------------------

    def _run(self, client: httpx.Client, plan: _Plan) -> dict[str, Any]:
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            plan.redirects.clear()
            try:
                return self._attempt(client, plan, attempt, started)
            except _Retry as retry:
                left = plan.deadline - time.monotonic()
                backoff = random.uniform(0.5, 1.0) * min(MAX_BACKOFF_S, 0.1 * 2 ** (attempt - 1))
                wait = max(backoff, retry.wait or 0.0)
                if attempt >= plan.policy.max_attempts or wait >= left:
                    retry.error.details["attempts"] = attempt
                    raise retry.error from None
                time.sleep(wait)

    def _attempt(
        self, client: httpx.Client, plan: _Plan, attempt: int, started: float
    ) -> dict[str, Any]:
        method, url, content = plan.method, plan.url, plan.content
        for _hop in range(plan.policy.max_redirects + 1):
            request = self._request(client, plan, method, url, content)
            sent = time.monotonic()
            response = self._send(client, plan, request)
            ttfb = time.monotonic() - sent
            try:
                location = response.headers.get("location")
                if response.status_code in (301, 302, 303, 307, 308) and location:
                    try:
                        nxt = response.url.join(location)
                    except httpx.InvalidURL:
                        plan.guard.check_url(location)
                        raise UpstreamError(
                            f"the server redirected to an invalid URL {plan.scrub(location)!r}",
                            retryable=False,
                        ) from None
                    plan.redirects.append(plan.scrub(str(nxt)))
                    if response.status_code == 303 or (
                        response.status_code in (301, 302) and method == "POST"
                    ):
                        method = "GET" if method != "HEAD" else "HEAD"
                        content = None
                    url = nxt
                    continue
                try:
                    body = read_capped(response, plan.policy.max_body_bytes, plan.deadline)
                except httpx.TransportError as exc:
                    raise self._transport_error(plan, exc, sent_request=True) from None
            finally:
                response.close()
            self._check_status(plan, response, body)
            return self._output(plan, response, body, attempt, started, ttfb)
        raise UpstreamError(
            f"more than {plan.policy.max_redirects} redirects; the last one pointed to "
            f"{plan.scrub(str(url))}. Call the final URL directly",
            retryable=False,
            redirects=list(plan.redirects),
        )

    def _request(
        self,
        client: httpx.Client,
        plan: _Plan,
        method: str,
        url: httpx.URL,
        content: bytes | None,
    ) -> httpx.Request:
        headers = dict(plan.headers)
        if (url.scheme, url.host, port_of(url)) != (
            plan.url.scheme,
            plan.url.host,
            port_of(plan.url),
        ):
            # Like browsers: the agent's own credentials do not follow a cross-origin hop.
            for name in list(headers):
                if name.lower() in CREDENTIAL_HEADERS:
                    del headers[name]
        if content is None:
            for name in list(headers):
                if name.lower() == "content-type":
                    del headers[name]
        headers["Accept-Encoding"] = ACCEPT_ENCODING
        secret = plan.secret
        if secret is not None:
            if secret.allows(url.scheme, url.host, port_of(url)):
                url = inject_secret(headers, url, secret, plan.scheme, plan.name)
            else:
                plan.auth_stripped = True  # the binding does not cover this hop: send none
        timeout = max(0.001, plan.deadline - time.monotonic())
        return client.build_request(
            method,
            url,
            headers=headers,
            content=content,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    def _send(self, client: httpx.Client, plan: _Plan, request: httpx.Request) -> httpx.Response:
        if time.monotonic() >= plan.deadline:
            raise ActionTimeout(
                "the action's timeout ran out before the request could be sent; "
                "ask for a longer timeout_s",
                retryable=True,
            )
        try:
            # Straight to the transport, not ``client.send``: httpx would parse a redirect's
            # Location itself and fail on forms (octal IPs) the guard should judge.
            assert plan.transport is not None
            response = plan.transport.handle_request(request)
            response.request = request
            return response
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._transport_error(plan, exc, sent_request=False) from None
        except httpx.TransportError as exc:
            raise self._transport_error(plan, exc, sent_request=True) from None

    def _transport_error(
        self, plan: _Plan, exc: httpx.TransportError, *, sent_request: bool
    ) -> _Retry | ActionError:
        what = plan.scrub(str(exc)) or type(exc).__name__
        if isinstance(exc, httpx.TimeoutException):
            error: ActionError = ActionTimeout(
                f"the request timed out ({type(exc).__name__}: {what}); the server is slow "
                "or unreachable: retry later or ask for a longer timeout_s",
                retryable=True,
            )
        else:
            error = UpstreamError(
                f"the connection failed ({type(exc).__name__}: {what}); retry later",
                retryable=True,
            )
        if not sent_request or plan.safe_to_repeat:
            return _Retry(error)
        # A POST/PATCH without Idempotency-Key may have been processed: never repeat it.
        error.retryable = False  # type: ignore[misc]
        error.message = (
            f"the connection failed after the {plan.method} was sent ({type(exc).__name__}); "
            "the server may have processed it, so it was not repeated. Check the server's "
            "state, or send an Idempotency-Key so the worker can retry safely"
        )
        error.args = (error.message,)
        error.details["may_have_been_processed"] = True
        return error

    def _check_status(self, plan: _Plan, response: httpx.Response, body: Body) -> None:
        status = response.status_code
        if status not in RETRY_STATUSES and status < 500:
            return
        wait = retry_after_s(response.headers.get("retry-after"))
        output = self._output(plan, response, body, 0, time.monotonic(), 0.0)
        output.pop("attempts", None)
        if status == 429:
            error: ActionError = RateLimited(
                "the server rate-limited the request (429)"
                + (f"; wait {wait:g}s before sending again" if wait is not None else "")
                + ". Retry later",
                output=output,
                status=status,
                retry_after_s=wait,
            )
        else:
            # A 5xx to a request that is not safe to repeat may have had effects: the
            # action-level retries must not repeat it either.
            error = UpstreamError(
                f"the server answered {status} {response.reason_phrase}; "
                + (
                    "retry later"
                    if plan.safe_to_repeat
                    else "it may have processed the request, which is not safe to repeat "
                    "without an Idempotency-Key"
                ),
                output=output,
                retryable=plan.safe_to_repeat,
                status=status,
                retry_after_s=wait,
            )
        if status in RETRY_STATUSES and plan.safe_to_repeat:
            raise _Retry(error, wait)
        raise error

    def _output(
        self,
        plan: _Plan,
        response: httpx.Response,
        body: Body,
        attempt: int,
        started: float,
        ttfb: float,
    ) -> dict[str, Any]:
        headers = {
            k: plan.scrub(response.headers[k]) for k in RESPONSE_HEADERS if k in response.headers
        }
        data, fmt = decode_body(body.data, response.headers.get("content-type", ""), plan.scrub)
        return {
            "status": response.status_code,
            "ok": response.is_success,
            "url": plan.scrub(str(response.url)),
            "headers": headers,
            "body": data,
            "body_format": fmt,
            "body_bytes": len(body.data),
            "truncated": body.truncated,
            "redirects": list(plan.redirects),
            "auth_stripped": plan.auth_stripped,
            "attempts": attempt,
            "timings": {
                "total_ms": int((time.monotonic() - started) * 1000),
                "ttfb_ms": int(ttfb * 1000),
            },
        }

    def close(self) -> None:
        pass
