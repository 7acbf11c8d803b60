"""The alerts' runbooks (exporter/runbooks.md, shipped in the package) as one HTML page.

Converts only the Markdown that file uses: headings with GitHub's anchor ids,
paragraphs, bullet and numbered lists, tables, fenced and inline code, bold,
italic and links. Every piece of text is escaped; a link keeps only an http(s),
mailto, relative or fragment address. No I/O beyond reading the packaged file.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from importlib.resources import files

__all__ = ["RUNBOOKS_RESOURCE", "heading_anchor", "read_runbooks", "render_page", "to_html"]

#: The runbooks' file name inside the `exporter` package.
RUNBOOKS_RESOURCE = "runbooks.md"

_HEADING = re.compile(r" {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_BULLET = re.compile(r"[-*+]\s+")
_NUMBERED = re.compile(r"(\d{1,9})[.)]\s+")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_TABLE_SEPARATOR = re.compile(r"\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.DOTALL)
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*]+?)(?<=\S)\*(?![*\w])")
#: Addresses a link may keep: a scheme-less (relative) one, a fragment, http(s) or mailto.
_SAFE_HREF = re.compile(r"(?:[^:/?#]*(?:[/?#]|$)|https?:|mailto:)", re.IGNORECASE)


def read_runbooks() -> str:
    """The Markdown text of the runbooks, as shipped in the package."""
    return files("exporter").joinpath(RUNBOOKS_RESOURCE).read_text(encoding="utf-8")


def heading_anchor(text: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def render_page(markdown: str, title: str = "jobstats-exporter runbooks") -> bytes:
    """A whole HTML document of `markdown`, linking back to the landing page."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{max-width:50em;margin:auto;padding:0 1em;font-family:sans-serif;line-height:1.45}}
code{{background:#f3f3f3}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em}}</style>
</head>
<body>
<p><a href="/">jobstats-exporter</a></p>
{to_html(markdown)}
</body></html>
""".encode()


def to_html(markdown: str) -> str:
    """The HTML of `markdown`'s blocks, one per line group, every text escaped."""
    return "\n".join(_blocks(markdown.splitlines()))


def _blocks(lines: list[str]) -> Iterator[str]:
    seen: dict[str, int] = {}
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
        elif fence := _FENCE.match(line):
            end = index + 1
            while end < len(lines) and not lines[end].lstrip().startswith(fence.group(1)):
                end += 1
            code = html.escape("\n".join(lines[index + 1 : end]))
            yield f"<pre><code>{code}</code></pre>"
            index = end + 1
        elif heading := _HEADING.match(line):
            level, text = len(heading.group(1)), heading.group(2)
            anchor = heading_anchor(_plain(text))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            unique = anchor if count == 0 else f"{anchor}-{count}"
            yield f'<h{level} id="{html.escape(unique)}">{_inline(text)}</h{level}>'
            index += 1
        elif _is_table(lines, index):
            end = index + 2
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            yield _table(lines[index], lines[index + 2 : end])
            index = end
        elif _BULLET.match(line) or _NUMBERED.match(line):
            end, html_list = _list(lines, index)
            yield html_list
            index = end
        else:
            end = index + 1
            while end < len(lines) and not _starts_block(lines, end):
                end += 1
            yield f"<p>{_inline(chr(10).join(lines[index:end]))}</p>"
            index = end


def _starts_block(lines: list[str], index: int) -> bool:
    """True when lines[index] ends a paragraph: a blank line or the start of another block."""
    line = lines[index]
    return (
        not line.strip()
        or bool(_FENCE.match(line) or _HEADING.match(line))
        or bool(_BULLET.match(line) or _NUMBERED.match(line))
        or _is_table(lines, index)
    )


def _is_table(lines: list[str], index: int) -> bool:
    return (
        lines[index].lstrip().startswith("|")
        and index + 1 < len(lines)
        and bool(_TABLE_SEPARATOR.match(lines[index + 1]))
    )


def _cells(row: str) -> list[str]:
    """The cells of a table row; a '|' inside a code span or escaped as '\\|' stays in its cell."""
    cells, current, in_code = [], "", False
    row = row.strip().removeprefix("|")
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    position = 0
    while position < len(row):
        char = row[position]
        if char == "\\" and row[position + 1 : position + 2] == "|":
            current += "|"
            position += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
        position += 1
    cells.append(current.strip())
    return cells


def _table(header: str, rows: list[str]) -> str:
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in _cells(header))
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in _cells(row)) + "</tr>"
        for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _list(lines: list[str], index: int) -> tuple[int, str]:
    """The list starting at lines[index]: where it ends, and its HTML.

    An item runs on over indented lines; a blank line or an unindented line that
    starts no item ends the list.
    """
    numbered = _NUMBERED.match(lines[index])
    marker = _NUMBERED if numbered else _BULLET
    items: list[str] = []
    while index < len(lines):
        line = lines[index]
        start = marker.match(line)
        if start:
            items.append(line[start.end() :])
        elif items and line.strip() and line[:1].isspace():
            items[-1] += "\n" + line.strip()
        else:
            break
        index += 1
    body = "\n".join(f"<li>{_inline(item)}</li>" for item in items)
    if numbered is None:
        return index, f"<ul>\n{body}\n</ul>"
    first = int(numbered.group(1))
    start_attribute = "" if first == 1 else f' start="{first}"'
    return index, f"<ol{start_attribute}>\n{body}\n</ol>"


def _inline(text: str) -> str:
    """Inline Markdown as HTML: code spans verbatim (escaped), the rest escaped then styled."""
    parts: list[str] = []
    position = 0
    for span in _CODE_SPAN.finditer(text):
        parts.append(_styled(text[position : span.start()]))
        parts.append(f"<code>{html.escape(span.group(2).strip())}</code>")
        position = span.end()
    parts.append(_styled(text[position:]))
    return "".join(parts)


def _styled(text: str) -> str:
    escaped = html.escape(text)
    escaped = _LINK.sub(_link, escaped)
    escaped = _BOLD.sub(r"<strong>\1</strong>", escaped)
    return _ITALIC.sub(r"<em>\1</em>", escaped)


def _link(match: re.Match[str]) -> str:
    label, href = match.group(1), match.group(2)
    # Both are escaped already; an address of another scheme (javascript:) stays text.
    if not _SAFE_HREF.match(html.unescape(href)):
        return match.group(0)
    return f'<a href="{href}">{label}</a>'


def _plain(text: str) -> str:
    """A heading's text as GitHub reads it for the anchor: without code and link markup."""
    text = _CODE_SPAN.sub(lambda span: span.group(2), text)
    return _LINK.sub(lambda link: link.group(1), text)
