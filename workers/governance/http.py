"""The approvers' HTTP endpoint (``actionfleet approvals serve --http HOST:PORT``).

Every request carries an approver token (``Authorization: Bearer afa1_…``, from
``actionfleet approvals approver add``); without a known token the answer is 401, and an
approver whose tenants do not cover an approval gets 403 for it. JSON in and out::

    GET  /approvals[?status=pending|approved|denied|expired|all]
    GET  /approvals/<id>
    POST /approvals/<id>/approve   {"reason": "..."}
    POST /approvals/<id>/deny      {"reason": "..."}

The token's name is the approver recorded with the decision (and audited). Bound to
loopback unless told otherwise; put TLS in front of it to serve beyond the machine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from workers.governance.approvals import ApprovalStore, decide_and_send
from workers.governance.approvers import Approver, ApproverStore

__all__ = ["ApprovalsServer", "serve"]

log = logging.getLogger(__name__)
_MAX_BODY = 64 * 1024
_STATUSES = ("pending", "approved", "denied", "expired", "all")


class ApprovalsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        store: ApprovalStore,
        approvers: ApproverStore,
        send: Callable[[dict[str, Any]], None],
    ) -> None:
        self.store = store
        self.approvers = approvers
        self.send = send
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def _error(field: str, reason: str, fix: str) -> dict[str, Any]:
    return {"error": {"field": field, "reason": reason, "fix": fix}}


class _Handler(BaseHTTPRequestHandler):
    server: ApprovalsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # never the Authorization header
        log.info("approvals http: " + fmt, *args)

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if status == 401:
            self.send_header("www-authenticate", 'Bearer realm="actionfleet-approvals"')
        self.end_headers()
        self.wfile.write(data)

    def _approver(self) -> Approver | None:
        header = self.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        approver = self.server.approvers.resolve(token) if token else None
        if approver is None:
            self._reply(
                401,
                _error(
                    "authorization",
                    "no approver token, or one this fleet does not know",
                    "send Authorization: Bearer <token from `actionfleet approvals approver add`>",
                ),
            )
        return approver

    def do_GET(self) -> None:
        approver = self._approver()
        if approver is None:
            return
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["approvals"]:
            status = parse_qs(url.query).get("status", ["pending"])[0]
            if status not in _STATUSES:
                self._reply(400, _error("status", f"unknown {status!r}", f"one of {_STATUSES}"))
                return
            rows = self.server.store.list(None if status == "all" else status)
            mine = [r.public() for r in rows if approver.may_decide(r.tenant_id)]
            self._reply(200, {"approvals": mine})
            return
        if len(parts) == 2 and parts[0] == "approvals":
            record = self.server.store.get(parts[1])
            if record is None or not approver.may_decide(record.tenant_id):
                self._reply(404, _error("id", f"no approval {parts[1]!r}", "see GET /approvals"))
                return
            self._reply(200, record.public(with_payload=True))
            return
        self._reply(404, _error("path", "unknown path", "GET /approvals or /approvals/<id>"))

    def do_POST(self) -> None:
        approver = self._approver()
        if approver is None:
            return
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
        if len(parts) != 3 or parts[0] != "approvals" or parts[2] not in ("approve", "deny"):
            self._reply(404, _error("path", "unknown path", "POST /approvals/<id>/approve|deny"))
            return
        size = int(self.headers.get("content-length") or 0)
        if size > _MAX_BODY:
            self._reply(413, _error("body", "larger than 64 KiB", "send {'reason': '...'}"))
            return
        try:
            body = json.loads(self.rfile.read(size) or b"{}")
            reason = body.get("reason") if isinstance(body, dict) else None
        except ValueError:
            reason = None
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 2000:
            self._reply(
                400, _error("reason", "missing or empty", 'send {"reason": "why"} (2000 chars)')
            )
            return
        record = self.server.store.get(parts[1])
        if record is None or not approver.may_decide(record.tenant_id):
            code = 404 if record is None else 403
            self._reply(
                code, _error("id", f"no approval {parts[1]!r} you may decide", "GET /approvals")
            )
            return
        status = "approved" if parts[2] == "approve" else "denied"
        decided = decide_and_send(
            self.server.store, self.server.send, parts[1], status, approver.name, reason.strip()
        )
        if not decided.decided or decided.status != status:  # taken first, or timed out
            self._reply(
                409,
                {
                    **_error("id", f"already {decided.status} by {decided.by}", "nothing to do"),
                    "status": decided.status,
                    "decided_by": decided.by,
                },
            )
            return
        assert decided.record is not None
        self._reply(200, decided.record.public())


def serve(server: ApprovalsServer) -> None:
    try:
        server.serve_forever()
    finally:
        server.server_close()
