"""Concurrent scrapes of one target share one upstream request; min_interval shares its result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import Fetched, StatsClient
from exporter.collector import JobStatsCollector, ScrapeErrors, render_text
from exporter.errors import FetchError
from exporter.schedule import CronSchedules
from exporter.targets import Target

from samples import sample_bytes

URL = "http://api.test/api/jobs/stats"
SCRAPERS = 8
#: How long a fake upstream waits to be released at most, so a broken client fails, not hangs.
PATIENCE = 5.0


class Upstream:
    """A fake stats API that counts requests and answers only once released."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = 200
        self.body = sample_bytes("enabled")
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        self.started.set()
        async with asyncio.timeout(PATIENCE):
            await self.release.wait()
        return httpx.Response(self.status, content=self.body)


def client_for(upstream: Upstream, min_interval: float = 0.0) -> StatsClient:
    target = Target(
        name="test", url=URL, timeout=5.0, max_body_size=1024 * 1024, min_interval=min_interval
    )
    return StatsClient(target, httpx.MockTransport(upstream))


Test = Callable[[Upstream, StatsClient], Awaitable[None]]


def with_client(min_interval: float = 0.0) -> Callable[[Test], Callable[[], None]]:
    """Run the async test on a loop of its own, with a fresh upstream and client."""

    def decorate(test: Test) -> Callable[[], None]:
        def run() -> None:
            async def main() -> None:
                upstream = Upstream()
                client = client_for(upstream, min_interval)
                try:
                    await test(upstream, client)
                finally:
                    await client.close()

            asyncio.run(main())

        run.__name__ = test.__name__
        run.__doc__ = test.__doc__
        return run

    return decorate


async def fetch_together(client: StatsClient, upstream: Upstream) -> list[Fetched | BaseException]:
    """SCRAPERS scrapes fetch at once; the upstream answers once every one is waiting."""
    upstream.release.clear()
    tasks = [asyncio.create_task(client.fetch(5.0)) for _ in range(SCRAPERS)]
    async with asyncio.timeout(PATIENCE):
        await upstream.started.wait()
    # The scrapes started before the request did: each waits on it by now.
    upstream.release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


@with_client()
async def test_concurrent_fetches_share_one_upstream_request(
    upstream: Upstream, client: StatsClient
) -> None:
    results = await fetch_together(client, upstream)
    assert upstream.requests == 1
    assert [r.body if isinstance(r, Fetched) else r for r in results] == [upstream.body] * SCRAPERS


@with_client()
async def test_an_upstream_error_reaches_every_caller_that_shared_it(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.status = 503
    errors = await fetch_together(client, upstream)
    assert upstream.requests == 1
    assert all(isinstance(error, FetchError) for error in errors)
    assert {error.reason for error in errors if isinstance(error, FetchError)} == {"http_status"}
    assert all("HTTP status 503" in str(error) for error in errors)
    # Each caller has its own exception object: tracebacks do not pile up on one.
    assert len({id(error) for error in errors}) == SCRAPERS


@with_client()
async def test_a_fetch_after_the_shared_one_completes_asks_again(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.release.set()
    assert await client.fetch(5.0) == Fetched(upstream.body)
    upstream.body = b'{"second": true}'
    assert await client.fetch(5.0) == Fetched(b'{"second": true}')
    assert upstream.requests == 2


@with_client()
async def test_after_a_shared_failure_the_next_fetch_asks_again(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.release.set()
    upstream.status = 500
    with pytest.raises(FetchError):
        await client.fetch(5.0)
    upstream.status = 200
    assert (await client.fetch(5.0)).body == upstream.body
    assert upstream.requests == 2


@with_client(min_interval=60.0)
async def test_min_interval_answers_from_the_last_result_with_its_age(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.release.set()
    first = await client.fetch(5.0)
    assert first == Fetched(upstream.body, 0.0)
    upstream.body = b"changed"
    second = await client.fetch(5.0)
    assert second.body == first.body
    assert second.age > 0
    assert upstream.requests == 1


@with_client(min_interval=60.0)
async def test_min_interval_reuses_a_failure_with_its_reason(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.release.set()
    upstream.status = 502
    with pytest.raises(FetchError) as first:
        await client.fetch(5.0)
    upstream.status = 200
    with pytest.raises(FetchError) as second:
        await client.fetch(5.0)
    assert first.value.reason == second.value.reason == "http_status"
    assert str(second.value) == str(first.value)
    assert upstream.requests == 1


@with_client(min_interval=60.0)
async def test_min_interval_concurrent_first_fetches_still_share_one_request(
    upstream: Upstream, client: StatsClient
) -> None:
    results = await fetch_together(client, upstream)
    assert [r.body if isinstance(r, Fetched) else r for r in results] == [upstream.body] * SCRAPERS
    assert (await client.fetch(5.0)).body == upstream.body
    assert upstream.requests == 1


@with_client()
async def test_a_waiter_with_a_shorter_timeout_gives_up_alone(
    upstream: Upstream, client: StatsClient
) -> None:
    patient = asyncio.create_task(client.fetch(5.0))
    async with asyncio.timeout(PATIENCE):
        await upstream.started.wait()
    with pytest.raises(FetchError) as caught:
        await client.fetch(0.05)
    assert caught.value.reason == "timeout"
    assert "0.05s" in str(caught.value)
    upstream.release.set()
    assert (await patient).body == upstream.body
    assert upstream.requests == 1


# Through the collector


async def scrape(client: StatsClient) -> dict[str, float]:
    collector = JobStatsCollector(client, 5.0, CronSchedules("UTC"), ScrapeErrors())
    text = render_text(await collector.families())
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


@with_client(min_interval=60.0)
async def test_a_reused_result_exports_its_age(upstream: Upstream, client: StatsClient) -> None:
    upstream.release.set()
    first = await scrape(client)
    assert (first["jobstats_up"], first["jobstats_result_age_seconds"]) == (1, 0)
    second = await scrape(client)
    assert second["jobstats_up"] == 1
    assert second["jobstats_result_age_seconds"] > 0
    assert upstream.requests == 1


@with_client()
async def test_without_min_interval_every_scrape_is_fresh(
    upstream: Upstream, client: StatsClient
) -> None:
    upstream.release.set()
    for expected in (1, 2):
        values = await scrape(client)
        assert values["jobstats_result_age_seconds"] == 0
        assert upstream.requests == expected
