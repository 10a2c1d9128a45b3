"""What an action reads from the final page: text, markdown, links, title, html, and the
structured ``data`` (named selectors, tables: ``workers.browser.structured``).

Conversion runs inside the page (one ``evaluate`` per extract) so it sees the rendered
DOM, resolved absolute URLs and no more than the page really shows; no HTML parser is
needed on the worker. Every extract is capped; a capped value is listed in ``truncated``.
"""

from __future__ import annotations

from typing import Any

from playwright.async_api import Page

from producer.models import ExtractSelector
from workers.browser.structured import extract_data

__all__ = ["MAX_LINKS", "empty_data", "extract_all", "split_extract"]

MAX_LINKS = 1_000

# Main content: <main>, role=main, a single <article>, else <body>; page chrome removed.
# Markdown keeps headings, paragraphs, lists, links, emphasis, code, quotes and tables.
_MARKDOWN_JS = r"""
() => {
  const pick = () => {
    const main = document.querySelector('main, [role=main]');
    if (main) return main;
    const articles = document.querySelectorAll('article');
    if (articles.length === 1) return articles[0];
    return document.body;
  };
  const root = pick();
  if (!root) return '';
  const DROP = new Set(['SCRIPT','STYLE','NOSCRIPT','TEMPLATE','SVG','CANVAS','IFRAME',
                        'NAV','HEADER','FOOTER','ASIDE','BUTTON','SELECT','OPTION','INPUT']);
  const BLOCK = new Set(['P','DIV','SECTION','ARTICLE','MAIN','FORM','FIGURE','FIGCAPTION',
                         'DL','DT','DD','ADDRESS','DETAILS','SUMMARY','BODY','LABEL','FIELDSET']);
  const esc = (t) => t.replace(/([\\`*_\[\]])/g, '\\$1');
  const squash = (t) => t.replace(/[ \t\r\n\f]+/g, ' ');
  const hidden = (el) => el.hidden || el.getAttribute('aria-hidden') === 'true';

  function inline(node) {
    let out = '';
    for (const c of node.childNodes) {
      if (c.nodeType === Node.TEXT_NODE) { out += esc(squash(c.textContent)); continue; }
      if (c.nodeType !== Node.ELEMENT_NODE || DROP.has(c.tagName) || hidden(c)) continue;
      const t = c.tagName;
      const inner = inline(c);
      if (t === 'A') {
        const href = c.href || '';
        const label = inner.trim();
        out += (href.startsWith('http') && label) ? `[${label}](${href})` : inner;
      } else if (t === 'STRONG' || t === 'B') out += inner.trim() ? `**${inner.trim()}**` : '';
      else if (t === 'EM' || t === 'I') out += inner.trim() ? `*${inner.trim()}*` : '';
      else if (t === 'CODE') out += '`' + c.textContent + '`';
      else if (t === 'BR') out += '\n';
      else if (t === 'IMG') {
        const alt = (c.getAttribute('alt') || '').trim();
        if (alt && c.src && c.src.startsWith('http')) out += `![${esc(alt)}](${c.src})`;
      } else out += inner;
    }
    return out;
  }

  function blocks(node, out, depth) {
    for (const c of node.childNodes) {
      if (c.nodeType === Node.TEXT_NODE) {
        const t = squash(c.textContent).trim();
        if (t) out.push(esc(t));
        continue;
      }
      if (c.nodeType !== Node.ELEMENT_NODE || DROP.has(c.tagName) || hidden(c)) continue;
      const t = c.tagName;
      if (/^H[1-6]$/.test(t)) {
        const text = inline(c).trim();
        if (text) out.push('#'.repeat(Number(t[1])) + ' ' + text);
      } else if (t === 'UL' || t === 'OL') {
        const items = [];
        let n = 1;
        for (const li of c.children) {
          if (li.tagName !== 'LI' || hidden(li)) continue;
          const mark = t === 'OL' ? `${n++}.` : '-';
          const sub = [];
          blocks(li, sub, depth + 1);
          const body = sub.join('\n').trim();
          if (body) items.push('  '.repeat(depth) + mark + ' ' + body);
        }
        if (items.length) out.push(items.join('\n'));
      } else if (t === 'PRE') {
        out.push('```\n' + c.textContent.replace(/\n+$/, '') + '\n```');
      } else if (t === 'BLOCKQUOTE') {
        const sub = [];
        blocks(c, sub, depth);
        const body = sub.join('\n\n').trim();
        if (body) out.push(body.split('\n').map((l) => '> ' + l).join('\n'));
      } else if (t === 'HR') {
        out.push('---');
      } else if (t === 'TABLE') {
        const rows = [...c.querySelectorAll('tr')].map((tr) =>
          [...tr.children].map((td) => inline(td).trim().replace(/\|/g, '\\|')));
        if (rows.length) {
          const width = Math.max(...rows.map((r) => r.length));
          const line = (r) => '| ' + [...r, ...Array(width - r.length).fill('')].join(' | ') + ' |';
          out.push([line(rows[0]), line(Array(width).fill('---')), ...rows.slice(1).map(line)]
                   .join('\n'));
        }
      } else if (BLOCK.has(t) || t === 'LI') {
        const hasBlock = [...c.children].some((k) =>
          BLOCK.has(k.tagName) || /^(H[1-6]|UL|OL|PRE|TABLE|BLOCKQUOTE|HR)$/.test(k.tagName));
        if (hasBlock) blocks(c, out, depth);
        else {
          const text = inline(c).trim();
          if (text) out.push(text);
        }
      } else {
        const text = inline(c).trim();
        if (text) out.push(text);
      }
    }
  }
  const out = [];
  blocks(root, out, 0);
  return out.join('\n\n').replace(/\n{3,}/g, '\n\n').trim();
}
"""

_LINKS_JS = r"""
(max) => {
  const seen = new Set();
  const out = [];
  for (const a of document.querySelectorAll('a[href]')) {
    const url = a.href;
    if (!/^https?:/i.test(url) || seen.has(url)) continue;
    seen.add(url);
    out.push({url, text: (a.innerText || a.textContent || '').replace(/\s+/g, ' ').trim()
              .slice(0, 300)});
    if (out.length >= max) break;
  }
  return out;
}
"""


def _cap(value: str, limit: int) -> tuple[str, bool]:
    if len(value) <= limit:
        return value, False
    return value[:limit], True


def split_extract(
    extract: list[str | ExtractSelector],
) -> tuple[list[str], list[tuple[int, ExtractSelector]]]:
    """(names, selectors with their index in ``payload.extract``)."""
    names = [e for e in extract if isinstance(e, str)]
    selectors = [(i, e) for i, e in enumerate(extract) if isinstance(e, ExtractSelector)]
    return names, selectors


def empty_data(names: list[str], selectors: list[tuple[int, ExtractSelector]]) -> dict[str, Any]:
    """``output.data`` of a document without a DOM (a PDF): every key, nothing found."""
    data: dict[str, Any] = {s.name: [] if s.all else None for _, s in selectors}
    if "tables" in names:
        data["tables"] = []
    return data


async def extract_all(
    page: Page, extract: list[str | ExtractSelector], max_chars: int
) -> dict[str, Any]:
    """The requested extracts (screenshot is handled by the caller); ``data`` when named
    selectors or tables were asked for."""
    wanted, selectors = split_extract(extract)
    out: dict[str, Any] = {}
    truncated: list[str] = []
    for name in dict.fromkeys(wanted):  # each once, in the order asked
        if name == "text":
            value = await page.evaluate("() => document.body ? document.body.innerText : ''")
        elif name == "markdown":
            value = await page.evaluate(_MARKDOWN_JS)
        elif name == "html":
            value = await page.content()
        elif name == "links":
            links = await page.evaluate(_LINKS_JS, MAX_LINKS)
            out["links"] = links
            if len(links) >= MAX_LINKS:
                truncated.append("links")
            continue
        else:  # title is always in the output; screenshot is not text; tables is data
            continue
        out[name], cut = _cap(str(value or ""), max_chars)
        if cut:
            truncated.append(name)
    if selectors or "tables" in wanted:
        out["data"], cut_data = await extract_data(page, selectors, "tables" in wanted, max_chars)
        truncated += cut_data
    out["truncated"] = truncated
    return out
