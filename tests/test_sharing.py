"""Concurrent scrapes of one target share one upstream request; min_interval shares its result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import Fetched, StatsClient
from exporter.collector import JobStatsCollector, ScrapeErrors
from exporter.errors import FetchError
from exporter.schedule import CronSchedules
from exporter.targets import Target

from samples import sample_bytes

URL = "http://api.test/api/jobs/stats"
SCRAPERS = 8
#: How long a fake upstream waits for the scrapers at most, so a broken client fails, not hangs.
PATIENCE = 5.0


class Upstream:
    """A fake stats API that counts requests and answers only when told to, or when all wait."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = 200
        self.body = sample_bytes("enabled")
        self.started = threading.Event()
        self.release = threading.Event()
        #: Answer once this many tasks wait on the client's loop: the request and its callers.
        self.wait_for_tasks = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        self.started.set()
        deadline = asyncio.get_running_loop().time() + PATIENCE
        while asyncio.get_running_loop().time() < deadline:
            if self.release.is_set() or (
                self.wait_for_tasks and len(asyncio.all_tasks()) >= self.wait_for_tasks
            ):
                break
            await asyncio.sleep(0.005)
        # One more turn of the loop: tasks that just arrived reach their first await.
        await asyncio.sleep(0)
        return httpx.Response(self.status, content=self.body)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def client_for(upstream: Upstream, min_interval: float = 0.0) -> StatsClient:
    target = Target(
        name="test", url=URL, timeout=5.0, max_body_size=1024 * 1024, min_interval=min_interval
    )
    return StatsClient(target, httpx.MockTransport(upstream))


@pytest.fixture
def client(upstream: Upstream) -> Iterator[StatsClient]:
    stats_client = client_for(upstream)
    yield stats_client
    stats_client.close()


@pytest.fixture
def cached_client(upstream: Upstream) -> Iterator[StatsClient]:
    stats_client = client_for(upstream, min_interval=60.0)
    yield stats_client
    stats_client.close()


def fetch_together(client: StatsClient, upstream: Upstream) -> list[Future[Fetched]]:
    """SCRAPERS threads fetch at once; the upstream answers when every one is waiting."""
    upstream.release.clear()
    # The request's own task, and one task per caller blocked in fetch().
    upstream.wait_for_tasks = SCRAPERS + 1
    with ThreadPoolExecutor(SCRAPERS) as pool:
        futures = [pool.submit(client.fetch, 5.0) for _ in range(SCRAPERS)]
        for future in futures:
            future.exception(timeout=PATIENCE * 2)
    return futures


def test_concurrent_fetches_share_one_upstream_request(
    client: StatsClient, upstream: Upstream
) -> None:
    futures = fetch_together(client, upstream)
    assert upstream.requests == 1
    assert [future.result().body for future in futures] == [upstream.body] * SCRAPERS


def test_an_upstream_error_reaches_every_caller_that_shared_it(
    client: StatsClient, upstream: Upstream
) -> None:
    upstream.status = 503
    futures = fetch_together(client, upstream)
    assert upstream.requests == 1
    errors = [future.exception() for future in futures]
    assert all(isinstance(error, FetchError) for error in errors)
    assert {error.reason for error in errors if isinstance(error, FetchError)} == {"http_status"}
    assert all("HTTP status 503" in str(error) for error in errors)
    # Each caller has its own exception object: tracebacks do not pile up on one.
    assert len({id(error) for error in errors}) == SCRAPERS


def test_a_fetch_after_the_shared_one_completes_asks_again(
    client: StatsClient, upstream: Upstream
) -> None:
    upstream.release.set()
    assert client.fetch(5.0) == Fetched(upstream.body)
    upstream.body = b'{"second": true}'
    assert client.fetch(5.0) == Fetched(b'{"second": true}')
    assert upstream.requests == 2


def test_after_a_shared_failure_the_next_fetch_asks_again(
    client: StatsClient, upstream: Upstream
) -> None:
    upstream.release.set()
    upstream.status = 500
    with pytest.raises(FetchError):
        client.fetch(5.0)
    upstream.status = 200
    assert client.fetch(5.0).body == upstream.body
    assert upstream.requests == 2


def test_min_interval_answers_from_the_last_result_with_its_age(
    cached_client: StatsClient, upstream: Upstream
) -> None:
    upstream.release.set()
    first = cached_client.fetch(5.0)
    assert first == Fetched(upstream.body, 0.0)
    upstream.body = b"changed"
    second = cached_client.fetch(5.0)
    assert second.body == first.body
    assert second.age > 0
    assert upstream.requests == 1


def test_min_interval_reuses_a_failure_with_its_reason(
    cached_client: StatsClient, upstream: Upstream
) -> None:
    upstream.release.set()
    upstream.status = 502
    with pytest.raises(FetchError) as first:
        cached_client.fetch(5.0)
    upstream.status = 200
    with pytest.raises(FetchError) as second:
        cached_client.fetch(5.0)
    assert first.value.reason == second.value.reason == "http_status"
    assert str(second.value) == str(first.value)
    assert upstream.requests == 1


def test_min_interval_concurrent_first_fetches_still_share_one_request(
    cached_client: StatsClient, upstream: Upstream
) -> None:
    futures = fetch_together(cached_client, upstream)
    assert [future.result().body for future in futures] == [upstream.body] * SCRAPERS
    assert cached_client.fetch(5.0).body == upstream.body
    assert upstream.requests == 1


def test_a_waiter_with_a_shorter_timeout_gives_up_alone(
    client: StatsClient, upstream: Upstream
) -> None:
    with ThreadPoolExecutor(1) as pool:
        patient = pool.submit(client.fetch, 5.0)
        assert upstream.started.wait(PATIENCE)
        with pytest.raises(FetchError) as caught:
            client.fetch(0.05)
        assert caught.value.reason == "timeout"
        assert "0.05s" in str(caught.value)
        upstream.release.set()
        assert patient.result(timeout=PATIENCE).body == upstream.body
    assert upstream.requests == 1


# Through the collector


def scrape(client: StatsClient) -> dict[str, float]:
    collector = JobStatsCollector(client, 5.0, CronSchedules("UTC"), ScrapeErrors())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def test_a_reused_result_exports_its_age(cached_client: StatsClient, upstream: Upstream) -> None:
    upstream.release.set()
    first = scrape(cached_client)
    assert (first["jobstats_up"], first["jobstats_result_age_seconds"]) == (1, 0)
    second = scrape(cached_client)
    assert second["jobstats_up"] == 1
    assert second["jobstats_result_age_seconds"] > 0
    assert upstream.requests == 1


def test_without_min_interval_every_scrape_is_fresh(
    client: StatsClient, upstream: Upstream
) -> None:
    upstream.release.set()
    for expected in (1, 2):
        values = scrape(client)
        assert values["jobstats_result_age_seconds"] == 0
        assert upstream.requests == expected
