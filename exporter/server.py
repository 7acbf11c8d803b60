"""Serve /metrics, a landing page and health endpoints over HTTP/1.1 keep-alive.

One `Exporter` holds what lives between scrapes (upstream pool, cron cache,
error counters); each scrape gets its own registry, bound to that scrape's
timeout. The server is the standard library's; it never parses the upstream.
"""

from __future__ import annotations

import html
import logging
import math
import socket
import sys
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

import httpx
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from . import __version__
from .client import StatsClient, redact_url
from .collector import JobStatsCollector, ScrapeErrors
from .config import Config, parse_listen_address
from .schedule import CronSchedules

__all__ = ["SCRAPE_TIMEOUT_MARGIN", "Exporter", "MetricsServer", "scrape_timeout"]

#: Seconds kept back from Prometheus' scrape timeout, so our answer arrives before it gives up.
SCRAPE_TIMEOUT_MARGIN = 0.5

_TEXT = "text/plain; charset=utf-8"

log = logging.getLogger("jobstats_exporter")


def scrape_timeout(configured: float, header: str | None) -> float:
    """The upstream deadline: `configured`, bounded by X-Prometheus-Scrape-Timeout-Seconds.

    The header's value less a margin, or half of it when it is shorter than two margins;
    a header that is not a positive number is ignored.
    """
    try:
        offered = float(header) if header else math.nan
    except ValueError:
        offered = math.nan
    if not (offered > 0 and math.isfinite(offered)):
        return configured
    return min(configured, max(offered - SCRAPE_TIMEOUT_MARGIN, offered / 2))


class Exporter:
    """The exporter's long-lived parts, built from a Config; close() when done."""

    def __init__(
        self,
        config: Config,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.client = StatsClient(config.api_url, config.api_max_body_size, transport)
        self.schedules = CronSchedules(config.cron_timezone)
        self.errors = ScrapeErrors()
        self.clock = clock
        self._process = ProcessCollector(registry=None)

    def registry(self, timeout: float) -> CollectorRegistry:
        """A registry for one scrape: the job stats plus the process_* metrics."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            JobStatsCollector(self.client, timeout, self.schedules, self.errors, self.clock)
        )
        registry.register(self._process)
        return registry

    def metrics(self, accept: str | None, timeout_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, for one scrape."""
        encoder, content_type = choose_encoder(accept or "")
        timeout = scrape_timeout(self.config.api_timeout, timeout_header)
        return encoder(self.registry(timeout)), content_type

    def landing_page(self) -> bytes:
        target = html.escape(redact_url(self.config.api_url))
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jobstats-exporter</title></head>
<body>
<h1>jobstats-exporter</h1>
<p>Prometheus exporter for background job statistics (BullMQ queues over Redis).</p>
<p>Reads the job stats API at <code>{target}</code> once per scrape.</p>
<ul>
<li><a href="/metrics">Metrics</a></li>
<li><a href="/-/healthy">Health</a> and <a href="/-/ready">readiness</a></li>
</ul>
<p>Version {html.escape(__version__)}</p>
</body></html>
""".encode()

    def close(self) -> None:
        self.client.close()


class MetricsServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its Exporter."""

    daemon_threads = True

    def __init__(self, exporter: Exporter, address: str) -> None:
        host, port = parse_listen_address(address)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.exporter = exporter
        super().__init__((host, port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A scraper that hangs up is routine; anything else is a bug worth its traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        log.error("request failed", exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = host if self.address_family == socket.AF_INET else f"[{host}]"
        return f"http://{shown}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"jobstats-exporter/{__version__}"
    # Buffered writes: headers and body leave in one send, so Nagle never stalls a scrape.
    wbufsize = 64 * 1024
    # An idle keep-alive connection is closed after this many seconds.
    timeout = 300

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        exporter = cast(MetricsServer, self.server).exporter
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body, content_type = exporter.metrics(
                    self.headers.get("Accept"),
                    self.headers.get("X-Prometheus-Scrape-Timeout-Seconds"),
                )
            except Exception:
                # Upstream faults never get here (the collector answers them); this is a bug.
                log.exception("scrape failed on an internal error")
                self._answer(500, b"Internal error, see the exporter's log\n", _TEXT)
                return
            self._answer(200, body, content_type)
        elif path == "/":
            self._answer(200, exporter.landing_page(), "text/html; charset=utf-8")
        elif path == "/-/healthy":
            self._answer(200, b"Healthy\n", _TEXT)
        elif path == "/-/ready":
            self._answer(200, b"Ready\n", _TEXT)
        else:
            self._answer(404, b"Not found. Metrics are at /metrics\n", _TEXT)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # The standard library logs every request to stderr; scrapes are not news.
        pass
