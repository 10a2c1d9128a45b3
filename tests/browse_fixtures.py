"""Fixtures for the browse tests: a real multi-page HTTP site on loopback and a real
in-process ``BrowseExecutor`` (real Chromium, real egress proxy)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from producer.errors import ActionError
from producer.models import BrowseAction, action_adapter
from tests.services import require
from workers.middleware import ActionContext
from workers.outbound.egress import Resolver, StaticResolver
from workers.outbound.secrets import build_secret_store
from workers.policy import Grant, TenantPolicy
from workers.workspace.tenant import Workspaces

CHROMIUM = Path(os.environ.get("ACTIONFLEET_BROWSER_EXECUTABLE", "/usr/bin/chromium"))
LOCAL_EGRESS = {"allow_cidrs": ["127.0.0.0/8"], "any_port": True}

_PAGE = "<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"
PAGES: dict[str, tuple[str, str]] = {
    "/": (
        "Home",
        '<nav><a href="/">Home</a> | <a href="/about">About</a></nav>'
        "<main><h1>Welcome to the test site</h1>"
        "<p>This site has <strong>three</strong> pages and a "
        '<a id="to-form" href="/form">contact form</a>.</p>'
        '<ul><li>first point</li><li>second point</li></ul><p>Read <a href="/about">about us'
        "</a>.</p></main><footer>footer text</footer>",
    ),
    "/about": ("About", "<main><h2>About us</h2><p>We test browsers.</p></main>"),
    "/form": (
        "Contact",
        '<main><form action="/result" method="get">'
        '<label>Name <input id="name" name="name"></label>'
        '<select id="color" name="color"><option>red</option><option>green</option></select>'
        '<label><input type="checkbox" id="agree" name="agree"> agree</label>'
        '<button id="send" type="submit">Send</button></form></main>',
    ),
    "/set-state": (
        "Set",
        "<script>document.cookie = 'jscookie=from-js; path=/';"
        "localStorage.setItem('remember', 'from-storage');</script><p>state set</p>",
    ),
    "/read-state": (
        "Read",
        '<p id="out"></p><script>document.getElementById("out").textContent = '
        "'cookie=' + document.cookie + ' storage=' + localStorage.getItem('remember');"
        "</script>",
    ),
}


def make_pdf(pages: list[str], title: str = "") -> bytes:
    """A real PDF (1.4, one Helvetica line per page), built byte by byte: the fixture
    does not share code with the reader it tests."""
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids: list[str] = []
    font = 3 + 2 * len(pages)
    for i, text in enumerate(pages):
        page_no, content_no = 3 + 2 * i, 4 + 2 * i
        kids.append(f"{page_no} 0 R")
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 18 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_no} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>".encode()
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info = len(objects) + 1
    objects.append(f"<< /Title ({title}) >>".encode("latin-1"))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\n" % (len(objects) + 1, info)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def _encrypted(pdf: bytes, user_password: str) -> bytes:
    """``pdf`` encrypted (AES-256) with ``user_password`` ("" = opens without one)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=user_password, owner_password="owner-pw", algorithm="AES-256")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


PDF_PAGES = ["First page of the report", "Second page: results", "Third page: appendix"]
GOOD_PDF = make_pdf(PDF_PAGES, title="Quarterly Report")


def pdf_variant(kind: str) -> bytes:
    if kind == "good":
        return GOOD_PDF
    if kind == "locked":
        return _encrypted(GOOD_PDF, "s3cret")
    if kind == "owner-only":
        return _encrypted(GOOD_PDF, "")
    if kind == "broken":
        return GOOD_PDF[:200] + b"\x00garbage" * 20  # header and a cut first object
    if kind == "big":
        return make_pdf([f"page {i} " + "x" * 60 for i in range(200)])
    raise KeyError(kind)


def shop_page(n: int) -> str:
    """A product list, a button and three tables (thead, th first row, no header)."""
    names = ["Widget", "Gadget & Co", "Doohickey"]
    items = "".join(
        f'<li class="product"><a class="name" href="/p/{i}">{html.escape(names[i % 3])}</a> '
        f'<span class="price">${3 + i}.50</span></li>'
        for i in range(n)
    )
    return (
        f'<main><h1>Shop</h1><ul id="products">{items}</ul>'
        '<button id="buy"><b>Add</b> to cart</button>'
        '<table id="specs"><caption>Specs</caption><thead><tr><th>Name</th><th>Weight</th>'
        "</tr></thead><tbody><tr><td>Widget</td><td>1 kg</td></tr><tr><td>Gadget</td>"
        "<td>2\n   kg</td></tr></tbody></table>"
        "<table><tr><th>Q</th><th>A</th></tr><tr><td>Ships?</td><td>Yes</td></tr></table>"
        "<table><tr><td>no</td><td>header</td></tr></table></main>"
    )


@dataclass
class Site:
    port: int
    server: _Server
    release: threading.Event  # set at teardown: lets hung responses end

    @property
    def connections(self) -> int:
        """Connections this server accepted (any bytes at all, TLS or garbage too)."""
        return self.server.accepted

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(release: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "text/html", **hdrs: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in hdrs.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            path = parts.path
            if path in PAGES:
                title, body = PAGES[path]
                if path == "/read-state":
                    seen = html.escape(self.headers.get("Cookie", ""))
                    body += f'<p id="server">server-cookie=[{seen}]</p>'
                extra = {"Set_Cookie": "srv=from-header; Path=/"} if path == "/set-state" else {}
                self._send(200, _PAGE.format(title=title, body=body).encode(), **extra)
            elif path == "/result":
                body = (
                    f"<main><h1>Hello, {html.escape(q.get('name', ''))}</h1>"
                    f"<p>color={html.escape(q.get('color', ''))} "
                    f"agree={html.escape(q.get('agree', 'off'))}</p></main>"
                )
                self._send(200, _PAGE.format(title="Result", body=body).encode())
            elif path == "/redirect":
                self._send(302, b"", Location=q["to"])
            elif path == "/subres":
                # A page embedding one sub-resource (img) from wherever ?src= says.
                tag = q.get("tag", "img")
                src = html.escape(q["src"], quote=True)
                inner = {
                    "img": f'<img src="{src}">',
                    "ws": f"<script>try {{ new WebSocket('{src}'); }} catch (e) {{}}</script>",
                }[tag]
                self._send(200, _PAGE.format(title="Subres", body=f"<p>page</p>{inner}").encode())
            elif path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
                # A minimal websocket server: handshake, then one text frame "ws-hello".
                key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.write(b"\x81\x08ws-hello")
                self.wfile.flush()
                release.wait(5)
                self.close_connection = True
            elif path == "/ws-page":
                body = (
                    '<p id="ws">waiting</p><script>const ws = new WebSocket('
                    "location.origin.replace('http', 'ws') + '/ws');"
                    "ws.onmessage = (e) => { document.getElementById('ws').textContent = e.data; };"
                    "</script>"
                )
                self._send(200, _PAGE.format(title="WS", body=body).encode())
            elif path == "/mixed":
                # An article that pulls an image, a script, a fetch and a websocket from
                # ?other= (a host:port), and says when the fetch and the socket failed.
                other = html.escape(q["other"], quote=True)
                body = (
                    '<main><h1>Allowed article</h1><p id="body">The allowed text.</p>'
                    '<p id="fetch">fetch pending</p><p id="ws">ws pending</p></main>'
                    f'<img src="/pixel.png"><img src="http://{other}/tracker.png">'
                    f'<script src="https://{other}/lib.js"></script>'
                    f"<script>fetch('http://{other}/api').then("
                    "() => { document.getElementById('fetch').textContent = 'fetch-ok'; },"
                    " () => { document.getElementById('fetch').textContent = 'fetch-failed'; });"
                    f"const ws = new WebSocket('ws://{other}/ws');"
                    "const say = (t) => { document.getElementById('ws').textContent = t; };"
                    "ws.onerror = () => say('ws-failed'); ws.onopen = () => say('ws-open');"
                    "</script>"
                )
                self._send(200, _PAGE.format(title="Mixed", body=body).encode())
            elif path == "/leave":
                # A link that navigates the page itself to ?to=.
                to = html.escape(q["to"], quote=True)
                body = f'<a id="leave" href="{to}">leave</a>'
                self._send(200, _PAGE.format(title="Leave", body=body).encode())
            elif path == "/shop":
                body = shop_page(int(q.get("n", 3)))
                self._send(200, _PAGE.format(title="Shop", body=body).encode())
            elif path.endswith(".pdf"):
                self._send(200, pdf_variant(q.get("kind", "good")), "application/pdf")
            elif path == "/pixel.png":
                self._send(200, b"\x89PNG\r\n\x1a\n", "image/png")
            elif path == "/hang":
                # Headers and part of the body, then nothing: the load event never fires.
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"<html><head><title>Hang</title></head><body>loading")
                self.wfile.flush()
                release.wait(120)
            elif path == "/big":
                size = int(q.get("bytes", 1 << 20))
                self._send(200, b"<p>" + b"x" * size + b"</p>")
            elif path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                self._send(code, _PAGE.format(title=f"Status {code}", body="nope").encode())
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    accepted = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.accepted += 1  # counted before any parsing: a TLS hello counts too
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The proxy cuts connections on purpose (page budget, timeouts): not an error.
        pass


@contextmanager
def serve_site() -> Iterator[Site]:
    release = threading.Event()
    server = _Server(("127.0.0.1", 0), _handler(release))
    threading.Thread(target=server.serve_forever, name="test-site", daemon=True).start()
    try:
        yield Site(server.server_address[1], server, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def require_chromium() -> None:
    require(CHROMIUM.exists() and shutil.which(str(CHROMIUM)) is not None, f"{CHROMIUM}")


# Test names for non-loopback addresses: the browser never resolves a name itself, and
# only the proxy (in this test process, under the tripwire) asks this resolver.
RESOLVER = StaticResolver(
    {
        "site.test": ["127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "private.test": ["10.0.0.1"],
        # A third-party host (a second loopback server) and an allow-listed name that
        # points at a private address.
        "cdn.test": ["127.0.0.1"],
        "intranet.site.test": ["10.0.0.2"],
    }
)


@contextmanager
def browse_executor_in(root: Path, resolver: Resolver = RESOLVER) -> Iterator[Any]:
    """One executor (one Chromium), as one worker process has; ``root`` holds its
    workspaces and secrets directories."""
    require_chromium()
    from workers.executors.browse import BrowseExecutor

    (root / "secrets").mkdir(parents=True, exist_ok=True)
    executor = BrowseExecutor(
        executable=CHROMIUM,
        workspaces=Workspaces(root / "workspaces"),
        secrets=build_secret_store(root / "secrets"),
        resolver=resolver,
    )
    executor.test_root = root  # type: ignore[attr-defined]
    try:
        yield executor
    finally:
        executor.close()


def browse_action(url: str, tenant: str = "t1", **payload: Any) -> BrowseAction:
    action = action_adapter.validate_python(
        {
            "primitive": "browse",
            "tenant_id": tenant,
            "agent_id": "tester",
            "payload": {"url": url, **payload},
        }
    )
    assert isinstance(action, BrowseAction)
    return action


def tenant_policy(**sections: Any) -> TenantPolicy:
    return TenantPolicy.model_validate(sections)


def run(
    executor: Any,
    action: BrowseAction,
    policy: TenantPolicy | None = None,
    ctx: ActionContext | None = None,
) -> dict[str, Any]:
    """Execute in-process; returns the output (raises the ActionError on failure)."""
    policy = policy or tenant_policy(egress=LOCAL_EGRESS)
    ctx = ctx or ActionContext(
        primitive="browse", queue="actions.browse", worker="test", attempt=1, raw={}
    )
    return executor.execute(action, Grant(tenant=policy), ctx)  # type: ignore[no-any-return]


def run_error(executor: Any, action: BrowseAction, policy: TenantPolicy | None = None) -> Any:
    with pytest.raises(ActionError) as info:
        run(executor, action, policy)
    return info.value


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The local multi-page test site, served on loopback."""
    with serve_site() as s:
        yield s


@pytest.fixture(scope="module")
def browse_executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A browse executor (its own Chromium) in this process, for in-process tests."""
    with browse_executor_in(tmp_path_factory.mktemp("browse")) as executor:
        yield executor
