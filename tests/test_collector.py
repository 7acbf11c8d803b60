"""What one scrape exposes, compared with golden exposition files per scenario.

Set UPDATE_GOLDEN=1 to rewrite the golden files after a deliberate change, then
read the diff before committing it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import collector as collector_module
from exporter.client import StatsClient
from exporter.collector import (
    SCRAPE_ERROR_REASONS,
    AnswerMemo,
    JobStatsCollector,
    ScrapeErrors,
    render_chunks,
    render_text,
)
from exporter.exposition import StaticCollector
from exporter.model import QueueStats
from exporter.schedule import CronSchedules, Schedule
from exporter.targets import Target

from samples import sample, sample_bytes

GOLDEN = Path(__file__).parent / "golden"
NOW = 1_795_772_000.0  # 160 s before the samples' nextRun
Handler = Callable[[httpx.Request], httpx.Response]


class Upstream:
    """A fake stats API for one test: set `handler`, count the requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.handler: Handler = lambda request: httpx.Response(200, content=b"{}")

    def serve(self, body: bytes | dict[str, Any], status: int = 200) -> None:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.handler = lambda request: httpx.Response(status, content=content)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return self.handler(request)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def client(upstream: Upstream) -> Iterator[StatsClient]:
    target = Target(
        name="test", url="http://api.test/api/jobs/stats", timeout=5.0, max_body_size=1024 * 1024
    )
    stats_client = StatsClient(target, httpx.MockTransport(upstream))
    yield stats_client
    asyncio.run(stats_client.close())


@pytest.fixture
def errors() -> ScrapeErrors:
    return ScrapeErrors()


@pytest.fixture
def scrape(client: StatsClient, errors: ScrapeErrors) -> Callable[[], str]:
    schedules = CronSchedules("UTC")

    def scrape_once() -> str:
        ticks = iter([10.0, 10.25])
        collector = JobStatsCollector(
            client, 5.0, schedules, errors, clock=lambda: NOW, timer=lambda: next(ticks)
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StaticCollector(asyncio.run(collector.families())))
        return generate_latest(registry).decode()

    return scrape_once


def assert_golden(name: str, text: str) -> None:
    # The Python version is the machine's, not the exporter's behaviour.
    text = re.sub(r'python_version="[^"]*"', 'python_version="X.Y.Z"', text)
    path = GOLDEN / f"{name}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"exposition differs from {path}"


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def edited(name: str, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = sample(name)
    edit(document)
    return document


SCENARIOS: dict[str, bytes | dict[str, Any]] = {
    "enabled": sample_bytes("enabled"),
    "no-scheduler": sample_bytes("no-scheduler"),
    "queue-paused": sample_bytes("queue-paused"),
    "redis-down": sample_bytes("redis-down"),
    "worker-stopped": sample_bytes("worker-stopped"),
    "malformed-queue": edited("enabled", lambda d: d["stats"]["inventory"].update(failed="abc")),
    "extra-states-unknown-status": edited(
        "enabled",
        lambda d: d["stats"]["product"].update(status="draining", paused=4, prioritized=2),
    ),
    "invalid-cron": edited(
        "enabled", lambda d: d["stats"]["product"]["recurringJobs"].update(cron="61 * * * *")
    ),
    "six-field-cron": edited(
        "enabled", lambda d: d["stats"]["product"]["recurringJobs"].update(cron="*/30 * * * * *")
    ),
    "odd-queue-names": edited(
        "enabled",
        lambda d: d.update(
            stats={
                'say "hi"': d["stats"]["inventory"],
                "back\\slash\nnew line": d["stats"]["product"],
                "очередь-✓": d["stats"]["product"],
                "redisStatus": "enabled",
            }
        ),
    ),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_exposition_matches_golden_file(
    scenario: str, upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(SCENARIOS[scenario])
    assert_golden(scenario, scrape())


def test_api_down_golden(upstream: Upstream, scrape: Callable[[], str]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    upstream.handler = refuse
    assert_golden("api-down", scrape())


def test_each_scrape_makes_exactly_one_upstream_request(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(sample_bytes("enabled"))
    for expected in (1, 2, 3):
        scrape()
        assert upstream.requests == expected


def test_enabled_sample_exports_the_five_counts_of_each_queue(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(sample_bytes("enabled"))
    values = samples_of(scrape())
    for name, entry in sample("enabled")["stats"].items():
        if not isinstance(entry, dict):
            continue
        for state in ("waiting", "active", "completed", "failed", "delayed"):
            key = ("jobstats_queue_jobs", (("queue", name), ("state", state)))
            assert values[key] == entry[state]


def test_queue_that_leaves_the_answer_disappears_on_next_scrape(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(sample_bytes("enabled"))
    assert 'queue="product"' in scrape()
    upstream.serve(edited("enabled", lambda d: d["stats"].pop("product")))
    text = scrape()
    assert 'queue="product"' not in text
    assert 'queue="inventory"' in text


def test_queue_that_joins_the_answer_appears_without_config(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(sample_bytes("enabled"))
    assert 'queue="emails"' not in scrape()
    upstream.serve(edited("enabled", lambda d: d["stats"].update(emails=d["stats"]["product"])))
    values = samples_of(scrape())
    assert values[("jobstats_queue_jobs", (("queue", "emails"), ("state", "delayed")))] == 1
    assert values[("jobstats_queues", ())] == 3


async def chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    """A streamed body with no Content-Length."""
    for _ in range(count):
        yield chunk


FAULTS: list[tuple[str, Handler, str]] = [
    (
        "503 with a valid body",
        lambda r: httpx.Response(503, content=sample_bytes("enabled")),
        "http_status",
    ),
    (
        "502 html",
        lambda r: httpx.Response(502, content=b"<html>SECRET-BODY-MARKER</html>"),
        "http_status",
    ),
    ("404", lambda r: httpx.Response(404, content=b"SECRET-BODY-MARKER"), "http_status"),
    (
        "200 html",
        lambda r: httpx.Response(200, content=b"<html>SECRET-BODY-MARKER</html>"),
        "invalid_json",
    ),
    (
        "not utf-8",
        lambda r: httpx.Response(200, content=b'{"SECRET-BODY-MARKER": "\xff"}'),
        "invalid_json",
    ),
    ("array", lambda r: httpx.Response(200, content=b'["SECRET-BODY-MARKER"]'), "invalid_payload"),
    (
        "success false",
        lambda r: httpx.Response(200, content=b'{"success": false, "error": "SECRET-BODY-MARKER"}'),
        "api_failure",
    ),
    (
        "stats missing",
        lambda r: httpx.Response(200, content=b'{"success": true, "x": "SECRET-BODY-MARKER"}'),
        "invalid_payload",
    ),
    (
        "too large",
        lambda r: httpx.Response(200, content=b"SECRET-BODY-MARKER" * 100_000),
        "too_large",
    ),
    (
        "too large, no content-length",
        lambda r: httpx.Response(200, content=chunks(b"SECRET-BODY-MARKER" * 1000, 100)),
        "too_large",
    ),
    (
        "refused",
        lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)),
        "connect",
    ),
    (
        "read timeout",
        lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("timed out", request=r)),
        "timeout",
    ),
]


@pytest.mark.parametrize(("fault", "handler", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_gives_up_zero_counted_reason_and_one_log_line(
    fault: str,
    handler: Handler,
    reason: str,
    upstream: Upstream,
    scrape: Callable[[], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.handler = handler
    with caplog.at_level(logging.INFO, logger="jobstats_exporter"):
        text = scrape()
    values = samples_of(text)
    assert values[("jobstats_up", ())] == 0
    for candidate in SCRAPE_ERROR_REASONS:
        expected = 1 if candidate == reason else 0
        assert values[("jobstats_scrape_errors_total", (("reason", candidate),))] == expected
    assert not [name for name, _ in values if name.startswith(("jobstats_queue", "jobstats_redis"))]
    (record,) = caplog.records
    assert record.reason == reason  # type: ignore[attr-defined]
    assert "SECRET" not in caplog.text
    assert "SECRET" not in text


def test_errors_accumulate_across_scrapes_and_success_resets_up(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(b"nope")
    scrape()
    scrape()
    upstream.serve(sample_bytes("enabled"))
    values = samples_of(scrape())
    assert values[("jobstats_up", ())] == 1
    assert values[("jobstats_scrape_errors_total", (("reason", "invalid_json"),))] == 2


def test_malformed_queue_is_logged_with_its_path(
    upstream: Upstream, scrape: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    upstream.serve(SCENARIOS["malformed-queue"])
    with caplog.at_level(logging.INFO, logger="jobstats_exporter"):
        values = samples_of(scrape())
    assert values[("jobstats_invalid_queues", ())] == 1
    assert values[("jobstats_queues", ())] == 1
    (record,) = caplog.records
    assert "stats.inventory.failed" in record.err  # type: ignore[attr-defined]


def test_odd_queue_names_come_back_as_the_exact_label_values(
    upstream: Upstream, scrape: Callable[[], str]
) -> None:
    upstream.serve(SCENARIOS["odd-queue-names"])
    names = {
        dict(labels)["queue"]
        for name, labels in samples_of(scrape())
        if name == "jobstats_queue_jobs"
    }
    assert names == {'say "hi"', "back\\slash\nnew line", "очередь-✓"}


@pytest.mark.parametrize("scenario", [*SCENARIOS, "api-down"])
def test_fast_text_rendering_is_what_prometheus_client_writes(
    scenario: str, upstream: Upstream, client: StatsClient, errors: ScrapeErrors
) -> None:
    if scenario == "api-down":

        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        upstream.handler = refuse
    else:
        upstream.serve(SCENARIOS[scenario])
    ticks = iter([10.0, 10.25])
    collector = JobStatsCollector(
        client, 5.0, CronSchedules("UTC"), errors, clock=lambda: NOW, timer=lambda: next(ticks)
    )
    families = asyncio.run(collector.families())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    expected = generate_latest(registry)
    assert render_text(families) == expected.decode()
    assert b"".join(render_chunks(families)) == expected


def test_a_memo_renders_what_a_fresh_scrape_renders_as_the_answer_changes(
    upstream: Upstream, client: StatsClient
) -> None:
    """The memo reuses each unchanged queue's lines; every step must read the same as a
    scrape that builds everything afresh."""
    answer = sample("enabled")
    queues = answer["stats"]
    queues["third"] = dict(queues["product"], failed=9)
    steps: list[tuple[str, float]] = [("first answer", NOW), ("the same answer", NOW)]
    memo = AnswerMemo()
    schedules = CronSchedules("UTC")

    def text(now: float, with_memo: AnswerMemo | None) -> str:
        ticks = iter([10.0, 10.25])
        collector = JobStatsCollector(
            client,
            5.0,
            schedules,
            ScrapeErrors(),
            clock=lambda: now,
            timer=lambda: next(ticks),
            memo=with_memo,
        )
        return render_text(asyncio.run(collector.families()))

    def check(step: str, now: float) -> None:
        upstream.serve(answer)
        assert text(now, memo) == text(now, None), step

    for step, now in steps:
        check(step, now)
    kept = memo.texts
    check("nothing changed", NOW)
    assert all(map(operator.is_, memo.texts, kept)), "an unchanged answer is rendered again"

    rendered: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        jobs = collector_module.QUEUE_ROWS[0]

        def counted(queue: QueueStats, schedule: Schedule | None) -> Any:
            rendered.append(queue.name)
            return jobs(queue, schedule)

        patch.setattr(collector_module, "QUEUE_ROWS", (counted, *collector_module.QUEUE_ROWS[1:]))
        queues["inventory"]["failed"] += 1
        upstream.serve(answer)
        text(NOW, memo)
    assert rendered == ["inventory"], "only the queue that changed is rendered"
    check("one queue's count changed", NOW)
    # The queues after it were copied over at new offsets: reused again, they must fit.
    queues["inventory"]["failed"] += 1
    check("the same queue changed again", NOW)
    queues["product"]["waiting"] += 1
    check("the queue in the middle changed", NOW)
    assert 'queue="inventory",state="failed"} 5.0' in text(NOW, memo)

    queues["new"] = dict(queues.pop("product"), waiting=7)
    check("one queue gone, one new", NOW)

    queues["inventory"]["delayed"] = True  # was 1: equal in Python, no count in JSON
    check("a count became true", NOW)
    assert "jobstats_invalid_queues 1.0" in text(NOW, memo)

    queues["inventory"]["delayed"] = 1.0
    check("a count became 1.0", NOW)
    assert "jobstats_invalid_queues 1.0" in text(NOW, memo)

    queues["inventory"]["delayed"] = 1
    check("the count mended", NOW)
    check("a cron fire passed", NOW + 400)
    assert "jobstats_invalid_queues 0.0" in text(NOW + 400, memo)
