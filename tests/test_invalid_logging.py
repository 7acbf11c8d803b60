"""Malformed queues in one answer: a few logged one by one, the rest in one line per scrape.

An upstream that sends thousands of malformed queues must not write thousands of log
lines on every scrape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from exporter.client import StatsClient
from exporter.collector import MAX_LOGGED_INVALID, JobStatsCollector, ScrapeErrors
from exporter.schedule import CronSchedules
from exporter.targets import Target

#: Malformed queues past the ones logged one by one.
BEYOND = 15


def answer(valid: int, malformed: int) -> bytes:
    queue = {"waiting": 1, "active": 0, "completed": 2, "failed": 0, "delayed": 0}
    stats: dict[str, Any] = {f"good{index:02d}": queue for index in range(valid)}
    stats |= {f"bad{index:02d}": {**queue, "failed": "abc"} for index in range(malformed)}
    return json.dumps({"success": True, "stats": stats, "redisAvailable": True}).encode()


@pytest.fixture
def served() -> dict[str, bytes]:
    return {"body": b"{}"}


@pytest.fixture
def collector(served: dict[str, bytes]) -> Iterator[JobStatsCollector]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=served["body"])

    target = Target(
        name="test", url="http://api.test/api/jobs/stats", timeout=5.0, max_body_size=1024 * 1024
    )
    client = StatsClient(target, httpx.MockTransport(handler))
    yield JobStatsCollector(client, 5.0, CronSchedules("UTC"), ScrapeErrors())
    asyncio.run(client.close())


def scrape(collector: JobStatsCollector) -> None:
    asyncio.run(collector.families())


def logged(
    caplog: pytest.LogCaptureFixture, collector: JobStatsCollector
) -> list[logging.LogRecord]:
    with caplog.at_level(logging.INFO, logger="jobstats_exporter"):
        scrape(collector)
    return [record for record in caplog.records if record.name == "jobstats_exporter"]


def test_malformed_queues_past_the_cap_are_counted_in_one_line(
    served: dict[str, bytes], collector: JobStatsCollector, caplog: pytest.LogCaptureFixture
) -> None:
    served["body"] = answer(valid=2, malformed=MAX_LOGGED_INVALID + BEYOND)
    records = logged(caplog, collector)
    assert [record.getMessage() for record in records] == [
        *["queue skipped"] * MAX_LOGGED_INVALID,
        "more queues skipped",
    ]
    paths = [record.err.split(":")[0] for record in records[:-1]]  # type: ignore[attr-defined]
    assert paths == [f"stats.bad{index:02d}.failed" for index in range(MAX_LOGGED_INVALID)]
    assert records[-1].count == BEYOND  # type: ignore[attr-defined]


def test_malformed_queues_up_to_the_cap_are_each_logged_and_no_summary(
    served: dict[str, bytes], collector: JobStatsCollector, caplog: pytest.LogCaptureFixture
) -> None:
    served["body"] = answer(valid=2, malformed=MAX_LOGGED_INVALID)
    records = logged(caplog, collector)
    assert [record.getMessage() for record in records] == ["queue skipped"] * MAX_LOGGED_INVALID


def test_the_cap_is_a_handful_of_lines() -> None:
    # Importing the cap above would let it grow to "every queue" unseen.
    assert 1 <= MAX_LOGGED_INVALID <= 20
