"""What a scrape shows of a Redis source, from the captured BullMQ streams.

The families are compared with a golden exposition file, and the fast text rendering
with what prometheus_client writes for the same families (histograms included).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import StatsClient
from exporter.collector import JobStatsCollector, ScrapeErrors, redis_families
from exporter.events import EventCounts, RedisView
from exporter.exposition import StaticCollector, render_chunks, render_text
from exporter.schedule import CronSchedules
from exporter.targets import Target

from samples import bullmq_capture, sample_bytes

GOLDEN = Path(__file__).parent / "golden"


def assert_golden(name: str, text: str) -> None:
    """`text` equals golden/NAME.prom; UPDATE_GOLDEN=1 rewrites it (then read the diff)."""
    path = GOLDEN / f"{name}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"exposition differs from {path}"


def captured_view(up: bool = True) -> RedisView:
    counts = EventCounts()
    for key, entries in bullmq_capture()["streams"].items():
        if key.endswith(":events"):
            queue = key.split(":")[1]
            counts.queue(queue)
            for entry_id, fields in entries:
                counts.apply(queue, entry_id, fields)
    # `product` is labelled `products` the way the stats API would name it.
    labels = {"inventory": "inventory", "product": "products"}
    return RedisView(
        up=up,
        counts={labels[name]: queue for name, queue in counts.queues.items()},
        oldest_waiting={"inventory": 0.0, "products": 12.5} if up else None,
        workers={"inventory": 1, "products": 1} if up else None,
        timings_dropped=counts.dropped,
    )


@pytest.mark.parametrize("up", [True, False])
def test_fast_rendering_of_redis_families_is_what_prometheus_client_writes(up: bool) -> None:
    families = redis_families(captured_view(up))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    expected = generate_latest(registry)
    assert render_text(families) == expected.decode()
    assert b"".join(render_chunks(families)) == expected


def test_redis_families_of_the_capture() -> None:
    assert_golden("redis-source", render_text(redis_families(captured_view())))


def test_redis_down_keeps_the_counters_and_leaves_out_what_needs_a_read() -> None:
    text = render_text(redis_families(captured_view(up=False)))
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "jobstats_redis_up" in names
    assert "jobstats_queue_jobs_failed" in names
    assert "jobstats_queue_oldest_waiting_job_age_seconds" not in names
    assert "jobstats_queue_workers" not in names
    assert "jobstats_redis_up 0.0\n" in text


def scrape(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[str, list[float]]:
    """One scrape of a target whose API answers by `handler` and whose Redis source shows
    the capture; the text, and the deadlines the Redis read was given."""
    target = Target(name="t", url="http://api.test/", timeout=5.0, max_body_size=1 << 20)
    client = StatsClient(target, httpx.MockTransport(handler))
    deadlines: list[float] = []

    async def view(deadline: float) -> RedisView:
        deadlines.append(deadline)
        return captured_view()

    async def scrape_once() -> str:
        collector = JobStatsCollector(
            client, 4.0, CronSchedules("UTC"), ScrapeErrors(), redis_view=view
        )
        try:
            return render_text(await collector.families())
        finally:
            await client.close()

    return asyncio.run(scrape_once()), deadlines


def test_a_scrape_with_a_redis_source_shows_both_sources() -> None:
    text, deadlines = scrape(lambda request: httpx.Response(200, content=sample_bytes("enabled")))
    assert deadlines == [4.0]
    assert "jobstats_up 1.0\n" in text
    assert 'jobstats_queue_jobs_failed_total{queue="inventory"} 2.0\n' in text
    assert 'jobstats_queue_jobs{queue="inventory",state="failed"}' in text


def test_an_api_down_scrape_still_shows_the_redis_counters() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    text, _ = scrape(refuse)
    assert "jobstats_up 0.0\n" in text
    assert "jobstats_redis_up 1.0\n" in text
    assert 'jobstats_queue_jobs_completed_total{queue="inventory"} 2.0\n' in text
