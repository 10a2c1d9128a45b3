"""A URL that answers with a PDF: its text, through pypdf, bounded in bytes and pages.

Chromium shows a PDF in its viewer, which gives the page no DOM text to read. When the
main document is a PDF (its ``Content-Type``), the worker fetches the same URL once more,
through the action's own egress proxy (the same guard, pinning and page budget; the
context's cookies and user agent), at most ``browse.max_pdf_bytes``, and reads the text of
at most ``browse.max_pdf_pages`` pages with pypdf in a thread (the browser's loop keeps
serving other actions). A malformed or password-protected PDF is ``upstream_error``.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from playwright.async_api import Page

from producer.errors import ResourceExhausted, UpstreamError
from workers.policy import BrowseLimits

__all__ = ["PDF_TYPES", "PdfText", "fetch_pdf", "is_pdf", "pdf_text", "read_pdf"]

PDF_TYPES = frozenset({"application/pdf", "application/x-pdf"})
_CHUNK = 64 * 1024


def is_pdf(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() in PDF_TYPES


@dataclass(frozen=True, slots=True)
class PdfText:
    text: str
    pages: int  # in the document
    pages_read: int  # at most max_pdf_pages
    title: str


def pdf_text(data: bytes, max_pages: int, url: str = "") -> PdfText:
    """The text of the first ``max_pages`` pages. Raises ``UpstreamError`` for a PDF
    that cannot be read (malformed, or encrypted with a password)."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    where = f" at {url}" if url else ""
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a broken file warns on every object
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            # Many PDFs are encrypted with an empty user password (permissions only) and
            # open above; this one needs a password we do not have.
            raise UpstreamError(
                f"the PDF{where} is password-protected and cannot be read; ask for an "
                "unprotected copy",
                retryable=False,
                reason="encrypted_pdf",
                url=url,
            )
        pages = len(reader.pages)
        if pages == 0:
            raise PdfReadError("the document has no pages")
        texts = [(page.extract_text() or "").strip() for page in reader.pages[:max_pages]]
        title = str((reader.metadata or {}).get("/Title") or "")
    except UpstreamError:
        raise
    except Exception as exc:  # pypdf raises many kinds on hostile input: all mean "broken"
        raise UpstreamError(
            f"the PDF{where} could not be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'malformed'}); it is "
            "malformed or truncated",
            retryable=False,
            reason="malformed_pdf",
            url=url,
        ) from None
    return PdfText("\n\n".join(t for t in texts if t), pages, len(texts), title)


async def fetch_pdf(
    url: str,
    *,
    proxy: str,
    headers: dict[str, str],
    max_bytes: int,
    timeout_s: float,
) -> bytes:
    """The bytes at ``url``, through the egress proxy, refusing more than ``max_bytes``."""
    async with (
        httpx.AsyncClient(
            proxy=proxy,
            trust_env=False,  # no environment proxy: only the action's own
            timeout=httpx.Timeout(max(0.5, timeout_s)),
            follow_redirects=True,
            max_redirects=5,
        ) as client,
        client.stream("GET", url, headers=headers) as resp,
    ):
        if resp.status_code >= 400:
            raise UpstreamError(
                f"{url} answered HTTP {resp.status_code} when its PDF was fetched; retry later",
                retryable=resp.status_code >= 500 or resp.status_code == 429,
                status=resp.status_code,
                url=url,
            )
        declared = int(resp.headers.get("content-length") or 0)
        data = bytearray()
        if declared <= max_bytes:
            async for chunk in resp.aiter_bytes(_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    break
        if declared > max_bytes or len(data) > max_bytes:
            raise ResourceExhausted(
                f"the PDF at {url} is larger than this tenant's limit of {max_bytes} bytes; "
                "ask for a smaller document",
                limit=max_bytes,
                url=url,
            )
        return bytes(data)


async def read_pdf(
    page: Page, url: str, wanted: list[str], limits: BrowseLimits, proxy: str, timeout_s: float
) -> tuple[dict[str, Any], list[str]]:
    """The text extracts of a PDF page (``text`` and ``markdown`` are its text; ``links``
    and ``html`` are empty) plus ``pdf`` facts, and what was cut."""
    cookies = await page.context.cookies([url])
    headers = {"User-Agent": await page.evaluate("() => navigator.userAgent")}
    if cookies:
        headers["Cookie"] = "; ".join(f"{c['name']}={c['value']}" for c in cookies)
    data = await fetch_pdf(
        url, proxy=proxy, headers=headers, max_bytes=limits.max_pdf_bytes, timeout_s=timeout_s
    )
    doc = await asyncio.to_thread(pdf_text, data, limits.max_pdf_pages, url)
    out: dict[str, Any] = {
        "content_type": "application/pdf",
        "pdf": {"pages": doc.pages, "pages_read": doc.pages_read, "bytes": len(data)},
    }
    if doc.title:
        out["title"] = doc.title
    truncated: list[str] = []
    text = doc.text
    if len(text) > limits.max_extract_chars:
        text = text[: limits.max_extract_chars]
        truncated.append("text")
    elif doc.pages_read < doc.pages:
        truncated.append("text")
    for name in dict.fromkeys(wanted):
        if name in ("text", "markdown"):
            out[name] = text
            if name == "markdown" and "text" in truncated:
                truncated.append("markdown")
        elif name == "links":
            out["links"] = []
        elif name == "html":
            out["html"] = ""
    return out, truncated
