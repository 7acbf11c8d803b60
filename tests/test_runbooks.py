"""The runbooks page: exporter/runbooks.md as HTML, with the anchors the alert rules link to."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from exporter.runbooks import read_runbooks, render_page, to_html

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "jobstats.rules.yml"


class Elements(HTMLParser):
    """The start tags of an HTML document, in order, with their attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    @classmethod
    def of(cls, document: str) -> Elements:
        parser = cls()
        parser.feed(document)
        parser.close()
        return parser

    def ids(self, tag: str | None = None) -> list[str]:
        return [
            str(attrs["id"])
            for name, attrs in self.tags
            if "id" in attrs and (tag is None or name == tag)
        ]

    def names(self) -> list[str]:
        return [name for name, _ in self.tags]


def rule_anchors() -> set[str]:
    """The fragments of the shipped rules' runbook_url annotations."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {
        rule["annotations"]["runbook_url"].partition("#")[2]
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    }


def test_shipped_runbooks_are_read_from_the_package() -> None:
    assert read_runbooks() == (ROOT / "exporter" / "runbooks.md").read_text(encoding="utf-8")


def test_every_alert_section_gets_the_anchor_its_rules_link_to() -> None:
    markdown = read_runbooks()
    sections = re.findall(r"^## (\S+)$", markdown, flags=re.MULTILINE)

    ids = Elements.of(to_html(markdown)).ids("h2")

    assert ids == [name.lower() for name in sections]
    assert rule_anchors() <= set(ids)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("## JobStatsQueueFailedJobs", "jobstatsqueuefailedjobs"),
        ("## What it *means*, and `why`!", "what-it-means-and-why"),
        ("### Blind spot (source=retained)", "blind-spot-sourceretained"),
        ("# snake_case-kept", "snake_case-kept"),
    ],
)
def test_heading_gets_githubs_anchor(heading: str, anchor: str) -> None:
    assert Elements.of(to_html(heading)).ids() == [anchor]


def test_repeated_heading_gets_a_numbered_anchor() -> None:
    ids = Elements.of(to_html("## Do\n\n## Do\n\n## Do\n")).ids()

    assert ids == ["do", "do-1", "do-2"]


def test_markup_in_the_text_comes_out_escaped() -> None:
    markdown = (
        "## <script>alert(1)</script>\n\n"
        'A <script>alert("x")</script> & `<img src=x onerror=alert(1)>`.\n\n'
        "| a | b |\n| --- | --- |\n| <b>cell</b> | `<i>` |\n\n"
        "- <iframe>\n"
    )

    page = to_html(markdown)

    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert set(Elements.of(page).names()) <= {
        "h2",
        "p",
        "code",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "ul",
        "li",
    }


def test_a_link_keeps_only_a_safe_address() -> None:
    page = to_html(
        "[web](https://example.com/a?b=1&c=2), [here](#jobstatsapidown), [bad](javascript:alert(1))"
    )

    hrefs = [attrs["href"] for name, attrs in Elements.of(page).tags if name == "a"]

    assert hrefs == ["https://example.com/a?b=1&c=2", "#jobstatsapidown"]
    assert "[bad](javascript:alert(1))" in page


def test_table_renders_header_and_rows() -> None:
    page = to_html(
        "| reason | what |\n| --- | --- |\n| `connect` | refused |\n| `a|b` | a \\| pipe |\n"
    )

    assert "<thead><tr><th>reason</th><th>what</th></tr></thead>" in page
    assert "<tr><td><code>connect</code></td><td>refused</td></tr>" in page
    assert "<tr><td><code>a|b</code></td><td>a | pipe</td></tr>" in page


def test_lists_render_with_their_continuation_lines() -> None:
    page = to_html(
        "**Do**:\n1. Is it running?\n   `systemctl status`\n2. Read its log.\n\n"
        "- one\n  more\n- two\n\n3. three\n"
    )

    assert "<p><strong>Do</strong>:</p>" in page
    assert "<ol>\n<li>Is it running?\n<code>systemctl status</code></li>\n" in page
    assert "<li>Read its log.</li>\n</ol>" in page
    assert "<ul>\n<li>one\nmore</li>\n<li>two</li>\n</ul>" in page
    assert '<ol start="3">\n<li>three</li>\n</ol>' in page


def test_fenced_code_is_kept_verbatim_and_escaped() -> None:
    page = to_html("```\n## not a heading\n<b>x</b> *y*\n```\n\nafter *it*\n")

    assert "<pre><code>## not a heading\n&lt;b&gt;x&lt;/b&gt; *y*</code></pre>" in page
    assert "<p>after <em>it</em></p>" in page
    assert Elements.of(page).ids() == []


def test_page_is_a_whole_document_of_the_shipped_runbooks() -> None:
    page = render_page(read_runbooks()).decode("utf-8")

    assert page.startswith("<!doctype html>")
    assert '<a href="/">' in page
    assert 'id="jobstatsexporterdown"' in page
