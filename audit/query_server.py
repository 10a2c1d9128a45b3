"""Read-only queries served by the ingester that holds a chDB store.

chDB lets one process open a data directory, and the ingester is that process while the
fleet runs; ``actionfleet audit …`` commands therefore ask it. Loopback only, a random
bearer token in a 0600 endpoint file inside the store directory, every query checked as
a single read statement and run with ``readonly=1`` and time and row limits, in the
default database ``actionfleet``; a refused query is answered with one line.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from audit.store import ClientReader, QueryError

__all__ = ["QueryServer"]

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20


class QueryServer:
    def __init__(self, client: Any, endpoint_file: Path, port: int = 0) -> None:
        self.reader = ClientReader(client, own=True)
        self.endpoint_file = endpoint_file
        self.token = secrets.token_urlsafe(24)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("query server: " + fmt, *args)

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, ensure_ascii=False, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/ping":
                    self._reply(200, {"ok": True, "pid": os.getpid()})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                auth = self.headers.get("Authorization", "")
                if not hmac.compare_digest(auth, f"Bearer {server.token}"):
                    self._reply(401, {"error": "bad or missing token"})
                    return
                if self.path != "/query":
                    self._reply(404, {"error": "not found"})
                    return
                size = int(self.headers.get("Content-Length") or 0)
                if size > MAX_BODY:
                    self._reply(413, {"error": "query too large"})
                    return
                try:
                    req = json.loads(self.rfile.read(size))
                    result = server.reader.query(str(req["sql"]), req.get("parameters") or None)
                except QueryError as exc:  # already one line (audit.sql_errors)
                    self._reply(400, {"error": str(exc), "name": exc.name, "subject": exc.subject})
                    return
                except Exception as exc:  # an error for the caller, not a crash here
                    self._reply(400, {"error": str(exc)[:2000]})
                    return
                self._reply(200, {"columns": result.columns, "rows": result.rows})

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="audit-query", daemon=True
        )
        self._thread.start()
        info = {"url": self.url, "token": self.token, "pid": os.getpid()}
        tmp = self.endpoint_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        tmp.replace(self.endpoint_file)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # gone or half-written: leave it
            if json.loads(self.endpoint_file.read_text()).get("pid") == os.getpid():
                self.endpoint_file.unlink()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.reader.close()
