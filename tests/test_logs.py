"""Log lines: one event a line, in logfmt or JSON, upstream text unable to break out."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from exporter.logs import configure_logging

LOGGER = logging.getLogger("jobstats_exporter")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    saved = LOGGER.handlers[:], LOGGER.level, LOGGER.propagate
    yield io.StringIO()
    LOGGER.handlers[:], LOGGER.level, LOGGER.propagate = saved


def test_logfmt_line_carries_level_message_and_fields(stream: io.StringIO) -> None:
    configure_logging("info", "logfmt", stream)
    LOGGER.warning("scrape failed", extra={"reason": "timeout", "err": "no answer in 1s"})
    line = stream.getvalue()
    assert line.count("\n") == 1
    assert " level=warn " in line
    assert 'msg="scrape failed"' in line
    assert "reason=timeout" in line
    assert 'err="no answer in 1s"' in line


def test_logfmt_escapes_newlines_and_quotes_from_upstream(stream: io.StringIO) -> None:
    configure_logging("info", "logfmt", stream)
    LOGGER.warning("queue skipped", extra={"err": 'stats["a\nlevel=error x=\\"y"].failed'})
    assert stream.getvalue().count("\n") == 1
    assert "\nlevel=error" not in stream.getvalue()


def test_json_format_is_one_object_a_line(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream)
    LOGGER.info("listening", extra={"address": "http://127.0.0.1:9787"})
    record = json.loads(stream.getvalue())
    assert record["level"] == "info"
    assert record["msg"] == "listening"
    assert record["address"] == "http://127.0.0.1:9787"


def test_level_filters_lower_events(stream: io.StringIO) -> None:
    configure_logging("error", "logfmt", stream)
    LOGGER.warning("not shown")
    assert stream.getvalue() == ""
