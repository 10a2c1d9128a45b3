"""Structured extraction (named selectors, tables) on a local shop page, and PDFs served on
loopback: real Chromium, the real egress proxy, pypdf on real PDF bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.errors import ResourceExhausted, UpstreamError, ValidationError_
from producer.validation import parse_action
from tests.browse_fixtures import (
    LOCAL_EGRESS,
    PDF_PAGES,
    Site,
    browse_action,
    pdf_variant,
    run,
    run_error,
    tenant_policy,
)


def test_named_selectors_and_tables(browse_executor: Any, site: Site) -> None:
    extract = [
        "title",
        {"name": "prices", "selector": ".product .price", "all": True},
        {"name": "names", "selector": ".product .name", "all": True},
        {"name": "urls", "selector": ".product a", "attr": "href", "all": True},
        {"name": "first", "selector": ".product .name"},
        {"name": "buy", "selector": "text=Add to cart", "attr": "html"},
        {"name": "heading", "selector": "xpath=//h1"},
        {"name": "missing", "selector": ".nope"},
        {"name": "none", "selector": ".nope", "all": True},
        "tables",
    ]
    out = run(browse_executor, browse_action(site.url("/shop"), extract=extract))
    data = out["data"]
    assert data["prices"] == ["$3.50", "$4.50", "$5.50"]
    assert data["names"] == ["Widget", "Gadget & Co", "Doohickey"]
    assert data["urls"] == [site.url(f"/p/{i}") for i in range(3)]  # absolute, as followed
    assert data["first"] == "Widget" and data["heading"] == "Shop"
    assert data["buy"] == "<b>Add</b> to cart"
    assert data["missing"] is None and data["none"] == []
    assert data["tables"] == [
        {
            "caption": "Specs",
            "header": ["Name", "Weight"],
            "rows": [["Widget", "1 kg"], ["Gadget", "2 kg"]],
            "row_count": 2,
        },
        {"caption": "", "header": ["Q", "A"], "rows": [["Ships?", "Yes"]], "row_count": 1},
        {"caption": "", "header": [], "rows": [["no", "header"]], "row_count": 1},
    ]
    assert out["truncated"] == [] and "text" not in out  # only what was asked


def test_structured_data_is_bounded(browse_executor: Any, site: Site) -> None:
    policy = tenant_policy(egress=LOCAL_EGRESS, browse={"max_extract_chars": 2048})
    extract = [{"name": "prices", "selector": ".price", "all": True}, "tables"]
    out = run(browse_executor, browse_action(site.url("/shop?n=1500"), extract=extract), policy)
    prices = out["data"]["prices"]
    assert 0 < len(prices) < 1500 and prices[:2] == ["$3.50", "$4.50"]
    assert len(json.dumps(out["data"], ensure_ascii=False)) <= 2048
    assert "data.prices" in out["truncated"]
    # Unbounded by the budget, a selector still stops at 1000 matches.
    out = run(browse_executor, browse_action(site.url("/shop?n=1500"), extract=extract[:1]))
    assert len(out["data"]["prices"]) == 1000 and out["truncated"] == ["data.prices"]


def test_a_bad_selector_is_invalid_and_names_its_field(browse_executor: Any, site: Site) -> None:
    extract = ["text", {"name": "x", "selector": "div[[["}]
    err = run_error(browse_executor, browse_action(site.url("/shop"), extract=extract))
    assert isinstance(err, ValidationError_) and err.status == "invalid"
    assert err.details["field"] == "payload.extract[1].selector"


@pytest.mark.parametrize(
    ("extract", "field"),
    [
        (["txt"], "payload.extract.0"),
        ([{"name": "p"}], "payload.extract.0.selector"),
        ([{"name": "p", "selector": ".a", "attr": "on click"}], "payload.extract.0.attr"),
        ([{"name": "p", "selector": ".a"}, {"name": "p", "selector": ".b"}], "payload.extract"),
        ([{"name": "tables", "selector": ".a"}], "payload.extract"),
    ],
)
def test_extract_items_are_validated_by_field(extract: list[Any], field: str) -> None:
    from producer.errors import InvalidAction

    raw = {
        "primitive": "browse",
        "tenant_id": "t",
        "agent_id": "a",
        "payload": {"url": "http://x/"},
    }
    raw["payload"]["extract"] = extract  # type: ignore[index]
    with pytest.raises(InvalidAction) as info:
        parse_action(raw)
    assert [e["field"] for e in info.value.errors] == [field]


def test_a_pdf_gives_its_text(browse_executor: Any, site: Site) -> None:
    extract = ["text", "markdown", "links", {"name": "p", "selector": "p", "all": True}]
    out = run(browse_executor, browse_action(site.url("/report.pdf"), extract=extract))
    assert out["status"] == 200 and out["content_type"] == "application/pdf"
    assert out["text"] == "\n\n".join(PDF_PAGES) == out["markdown"]
    assert out["title"] == "Quarterly Report"
    assert out["pdf"] == {"pages": 3, "pages_read": 3, "bytes": len(pdf_variant("good"))}
    assert out["links"] == [] and out["data"] == {"p": []} and out["truncated"] == []
    # A PDF encrypted only with an owner password opens without one.
    out = run(browse_executor, browse_action(site.url("/report.pdf?kind=owner-only")))
    assert out["text"].startswith(PDF_PAGES[0])


def test_pdf_pages_and_bytes_are_bounded(browse_executor: Any, site: Site) -> None:
    two_pages = tenant_policy(egress=LOCAL_EGRESS, browse={"max_pdf_pages": 2})
    out = run(browse_executor, browse_action(site.url("/report.pdf")), two_pages)
    assert out["text"] == "\n\n".join(PDF_PAGES[:2]) and out["truncated"] == ["text"]
    assert out["pdf"]["pages_read"] == 2 and out["pdf"]["pages"] == 3
    small = tenant_policy(egress=LOCAL_EGRESS, browse={"max_pdf_bytes": 4096})
    err = run_error(browse_executor, browse_action(site.url("/report.pdf?kind=big")), small)
    assert isinstance(err, ResourceExhausted) and err.details["limit"] == 4096


@pytest.mark.parametrize(
    ("kind", "reason"), [("broken", "malformed_pdf"), ("locked", "encrypted_pdf")]
)
def test_a_broken_or_locked_pdf_is_upstream_error(
    browse_executor: Any, site: Site, kind: str, reason: str
) -> None:
    url = site.url(f"/report.pdf?kind={kind}")
    err = run_error(browse_executor, browse_action(url))
    assert isinstance(err, UpstreamError) and err.type == "upstream_error"
    assert err.retryable is False and err.details["reason"] == reason
    assert err.details["url"] == url and "PDF" in err.message
    assert err.output is not None and err.output["url"] == url
