"""The HTTP side: endpoints, keep-alive, content negotiation and the scrape deadline."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import Config
from exporter.server import Exporter, MetricsServer, scrape_timeout, wants_openmetrics

from samples import sample_bytes

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.mark.parametrize(
    ("configured", "header", "expected"),
    [
        (10.0, None, 10.0),
        (10.0, "", 10.0),
        (10.0, "15", 10.0),
        (10.0, "5", 4.5),
        (10.0, "0.6", 0.3),
        (2.0, "5", 2.0),
        (10.0, "abc", 10.0),
        (10.0, "0", 10.0),
        (10.0, "-3", 10.0),
        (10.0, "nan", 10.0),
        (10.0, "inf", 10.0),
    ],
)
def test_scrape_timeout_is_bounded_by_prometheus_header(
    configured: float, header: str | None, expected: float
) -> None:
    assert scrape_timeout(configured, header) == pytest.approx(expected)


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        (None, False),
        ("", False),
        (PROMETHEUS_ACCEPT, False),
        ("text/plain", False),
        ("*/*", False),
        ("application/openmetrics-text; version=1.0.0", True),
        ("application/openmetrics-text;version=1.0.0,text/plain;q=0", True),
        ("application/json", False),
    ],
)
def test_openmetrics_only_for_clients_that_do_not_take_the_text_format(
    accept: str | None, openmetrics: bool
) -> None:
    assert wants_openmetrics(accept) is openmetrics


class Running:
    """An exporter served on 127.0.0.1 in this process, its upstream faked by `handler`."""

    def __init__(self, handler: Handler | Callable[[httpx.Request], object], config: Config):
        self.exporter = Exporter(config, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        self.server = MetricsServer(self.exporter, "127.0.0.1:0")
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.server.server_address[:2]
        return http.client.HTTPConnection(str(host), port, timeout=10)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        connection = self.connection()
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return (
                response.status,
                response.getheader("Content-Type") or "",
                response.read().decode(),
            )
        finally:
            connection.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.exporter.close()


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(handler: Handler, config: Config | None = None) -> Running:
        started.append(Running(handler, config or Config()))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def enabled(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=sample_bytes("enabled"))


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_metrics_endpoint_serves_text_exposition(running: Callable[..., Running]) -> None:
    status, content_type, body = running(enabled).get("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert value(body, "jobstats_up") == 1
    assert value(body, "jobstats_queue_jobs", queue="inventory", state="failed") == 3
    assert "process_cpu_seconds_total" in body


def test_openmetrics_is_served_when_asked(running: Callable[..., Running]) -> None:
    status, content_type, body = running(enabled).get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_keep_alive_serves_many_scrapes_on_one_connection(running: Callable[..., Running]) -> None:
    connection = running(enabled).connection()
    try:
        for _ in range(3):
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.version == 11
            assert response.status == 200
            assert b"jobstats_up 1.0" in response.read()
    finally:
        connection.close()


def test_landing_page_links_metrics_and_hides_credentials(running: Callable[..., Running]) -> None:
    config = Config(api_url="http://user:SECRET-PASS@api.test:3001/api/jobs/stats?token=SECRET-TOK")
    status, content_type, body = running(enabled, config).get("/")
    assert status == 200
    assert content_type.startswith("text/html")
    assert 'href="/metrics"' in body
    assert "http://api.test:3001/api/jobs/stats" in body
    assert "0.1.0" in body
    assert "SECRET" not in body


def test_runbooks_are_served_as_html_and_linked_from_the_landing_page(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled)

    status, content_type, body = exporter.get("/runbooks")

    assert status == 200
    assert content_type.startswith("text/html")
    assert '<h2 id="jobstatsqueuefailedjobs">JobStatsQueueFailedJobs</h2>' in body
    assert 'href="/runbooks"' in exporter.get("/")[2]
    assert exporter.get("/runbooks")[2] == body


@pytest.mark.parametrize(("path", "text"), [("/-/healthy", "Healthy"), ("/-/ready", "Ready")])
def test_health_endpoints(running: Callable[..., Running], path: str, text: str) -> None:
    assert running(enabled).get(path)[::2] == (200, f"{text}\n")


def test_unknown_path_is_404(running: Callable[..., Running]) -> None:
    assert running(enabled).get("/nope")[0] == 404


def test_prometheus_scrape_timeout_header_bounds_the_upstream_call(
    running: Callable[..., Running],
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, content=sample_bytes("enabled"))

    exporter = running(slow, Config(api_timeout=20.0))
    status, _, body = exporter.get("/metrics", {"X-Prometheus-Scrape-Timeout-Seconds": "0.6"})
    assert status == 200
    assert value(body, "jobstats_up") == 0
    assert value(body, "jobstats_scrape_errors_total", reason="timeout") == 1


def test_internal_error_answers_500_and_is_logged(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug, not an upstream fault")

    status, _, _ = running(broken).get("/metrics")
    assert status == 500
    assert "scrape failed on an internal error" in caplog.text
