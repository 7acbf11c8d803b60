"""Serve /metrics, /probe, the runbooks, a landing page and health endpoints over HTTP/1.1.

One `Exporter` holds what lives between scrapes (one client per target, the
cron cache, error counters); each scrape gets its own registry, bound to
that scrape's target and timeout, so /metrics and /probe share one code
path. /probe only takes the name of a configured target: it never fetches a
URL it is given. The server is the standard library's; TLS and basic auth
come from the web config file. /runbooks serves the alerts' runbooks, so the
rules' links resolve wherever Prometheus reaches the exporter.
"""

from __future__ import annotations

import concurrent.futures
import functools
import html
import logging
import math
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs, urlsplit

import httpx
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, generate_latest

from . import __version__
from .client import EventLoop, StatsClient, redact_url
from .collector import JobStatsCollector, ScrapeErrors, render_chunks
from .config import Config, parse_listen_address
from .runbooks import read_runbooks, render_page
from .schedule import CronSchedules
from .targets import Target
from .webconfig import WebConfig

if TYPE_CHECKING:
    from .events import Tailer

__all__ = [
    "SCRAPE_TIMEOUT_MARGIN",
    "Exporter",
    "MetricsServer",
    "UnknownTargetError",
    "scrape_timeout",
]

#: Seconds kept back from Prometheus' scrape timeout, so our answer arrives before it gives up.
SCRAPE_TIMEOUT_MARGIN = 0.5
#: Seconds a client has to finish the TLS handshake and send its request.
HANDSHAKE_TIMEOUT = 10.0
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
#: The Prometheus text exposition format, as every Prometheus version reads it.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
#: Paths answered without credentials: they tell nothing but that the process runs.
_OPEN_PATHS = ("/-/healthy", "/-/ready")

log = logging.getLogger("jobstats_exporter")


class UnknownTargetError(LookupError):
    """A /probe for a name that is not a configured target."""


def wants_openmetrics(accept: str | None) -> bool:
    """True when the client takes OpenMetrics but not the text format.

    Prometheus accepts both and gets the text format, as from client_golang by default:
    it carries the same samples and is written far faster here.
    """
    if not accept:
        return False
    openmetrics = False
    for media_range in accept.split(","):
        kind, *params = (part.strip() for part in media_range.split(";"))
        quality = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            if float(quality) <= 0:
                continue
        except ValueError:
            continue
        if kind in ("text/plain", "text/*", "*/*"):
            return False
        openmetrics = openmetrics or kind == "application/openmetrics-text"
    return openmetrics


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


@dataclass(frozen=True, slots=True)
class _TargetState:
    target: Target
    #: The stats API's client; None for a target read from its Redis source alone.
    client: StatsClient | None
    errors: ScrapeErrors
    #: The tailer of the target's BullMQ Redis, and its task; None without one.
    tailer: Tailer | None = None
    task: concurrent.futures.Future[None] | None = None


class Exporter:
    """The exporter's long-lived parts, built from a Config; close() when done."""

    def __init__(
        self,
        config: Config,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        tail: bool = True,
    ) -> None:
        self.config = config
        self.schedules = CronSchedules(config.cron_timezone)
        self.clock = clock
        self._loop = EventLoop()
        self._targets = {
            target.name: self._target_state(target, transport, tail) for target in config.targets
        }
        self.default_target = config.targets[0].name
        self._process = ProcessCollector(registry=None)
        self._process_registry = CollectorRegistry(auto_describe=False)
        self._process_registry.register(self._process)

    def _target_state(
        self, target: Target, transport: httpx.AsyncBaseTransport | None, tail: bool
    ) -> _TargetState:
        client = StatsClient(target, transport, self._loop) if target.url else None
        if target.redis is None or not tail:
            return _TargetState(target, client, ScrapeErrors())
        from .events import Tailer  # only a Redis source loads redis-py

        limits = self.config.limits
        tailer = Tailer(
            target.redis,
            limits.max_queues,
            limits.max_queue_name_length,
            target.redis.discovery_interval,
            # Without a stats API, the card itself comes from Redis.
            card=client is None,
        )
        task = self._loop.submit(tailer.run())
        task.add_done_callback(_report_crash)
        return _TargetState(target, client, ScrapeErrors(), tailer, task)

    def client_for(self, target: str | None) -> StatsClient | None:
        """The stats API client of `target` (default: the first), None when it has no API;
        UnknownTargetError if there is no such target."""
        return self._state(target).client

    def _state(self, target: str | None) -> _TargetState:
        state = self._targets.get(target or self.default_target)
        if state is None:
            raise UnknownTargetError(target)
        return state

    def registry(
        self, timeout: float | None = None, target: str | None = None
    ) -> CollectorRegistry:
        """A registry for one scrape of `target` (default: the first): stats plus process_*."""
        state = self._state(target)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector(state, timeout or state.target.timeout))
        registry.register(self._process)
        return registry

    def _collector(self, state: _TargetState, timeout: float) -> JobStatsCollector:
        tailer = state.tailer
        return JobStatsCollector(
            state.client,
            timeout,
            self.schedules,
            state.errors,
            self.config.limits,
            self.clock,
            redis_view=(lambda deadline: self._loop.submit(tailer.view(deadline)))
            if tailer is not None
            else None,
        )

    def metrics(
        self, accept: str | None, timeout_header: str | None, target: str | None = None
    ) -> tuple[list[bytes], str]:
        """The exposition, in chunks, and its content type, for one scrape.

        UnknownTargetError when `target` is not configured.
        """
        state = self._state(target)
        timeout = scrape_timeout(state.target.timeout, timeout_header)
        if wants_openmetrics(accept):
            encoder, content_type = choose_encoder(accept or "")
            return [encoder(self.registry(timeout, target))], content_type
        # The text format, written directly: what generate_latest writes, without its cost.
        families = self._collector(state, timeout).families()
        chunks = render_chunks(families)
        del families  # the rendered text is all that is needed now
        chunks.append(generate_latest(self._process_registry))
        return chunks, TEXT_FORMAT

    @functools.cached_property
    def runbooks_page(self) -> bytes:
        """The runbooks as HTML: read and rendered on the first request, then kept."""
        return render_page(read_runbooks())

    def landing_page(self) -> bytes:
        rows = "\n".join(
            f'<li><a href="/probe?target={html.escape(name)}">{html.escape(name)}</a>:'
            f" <code>{html.escape(source_of(state.target))}</code></li>"
            for name, state in self._targets.items()
        )
        default = html.escape(self.default_target)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jobstats-exporter</title></head>
<body>
<h1>jobstats-exporter</h1>
<p>Prometheus exporter for background job statistics (BullMQ queues over Redis).
Reads a job stats API once per scrape.</p>
<ul>
<li><a href="/metrics">Metrics</a> of the default target, <code>{default}</code></li>
<li><a href="/runbooks">Runbooks</a> of the alerts</li>
<li><a href="/-/healthy">Health</a> and <a href="/-/ready">readiness</a></li>
</ul>
<p>Targets, each at <code>/probe?target=NAME</code>:</p>
<ul>
{rows}
</ul>
<p>Version {html.escape(__version__)}</p>
</body></html>
""".encode()

    def close(self) -> None:
        for state in self._targets.values():
            if state.task is not None and state.tailer is not None:
                state.task.cancel()
                self._loop.run(state.tailer.close())
            if state.client is not None:
                state.client.close()
        self._loop.close()


def source_of(target: Target) -> str:
    """Where a target's stats come from, without credentials: for pages and logs."""
    if target.url is not None:
        return redact_url(target.url)
    assert target.redis is not None
    from .bullmq import where

    return f"{where(target.redis)} (BullMQ's Redis only)"


def _report_crash(task: concurrent.futures.Future[None]) -> None:
    """A tailer ends only when cancelled; any other end is a bug, logged with its traceback."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("redis source stopped on an internal error", exc_info=error)


class MetricsServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its Exporter, with optional TLS and basic auth."""

    daemon_threads = True

    def __init__(self, exporter: Exporter, address: str, web: WebConfig | None = None) -> None:
        host, port = parse_listen_address(address)
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.exporter = exporter
        self.web = web or WebConfig()
        self._tls = self.web.ssl_context() if self.web.tls else None
        super().__init__((host, port), _Handler)

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # The handshake runs here, in the connection's own thread: a slow client holds
        # up nobody else.
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secured = self._tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            log.info(
                "TLS handshake failed", extra={"client": str(client_address), "err": str(error)}
            )
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            # The wrapped socket now owns the connection: the server closes only the
            # original, which wrapping emptied.
            self.shutdown_request(secured)

    def handle_error(self, request: object, client_address: object) -> None:
        # A scraper that hangs up is routine; anything else is a bug worth its traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError | ssl.SSLError):
            return
        log.error("request failed", exc_info=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = host if self.address_family == socket.AF_INET else f"[{host}]"
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{shown}:{port}"


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
        server = cast(MetricsServer, self.server)
        exporter = server.exporter
        url = urlsplit(self.path)
        path = url.path
        if path not in _OPEN_PATHS and not server.web.authorized(self.headers.get("Authorization")):
            self._answer(
                401,
                b"Unauthorized\n",
                _TEXT,
                {"WWW-Authenticate": 'Basic realm="jobstats-exporter"'},
            )
            return
        if path in ("/metrics", "/probe"):
            target = None
            if path == "/probe":
                names = parse_qs(url.query).get("target", [])
                if len(names) != 1 or not names[0]:
                    self._answer(400, b"Give one target: /probe?target=NAME\n", _TEXT)
                    return
                target = names[0]
            self._scrape(exporter, target)
        elif path == "/":
            self._answer(200, exporter.landing_page(), _HTML)
        elif path == "/runbooks":
            self._answer(200, exporter.runbooks_page, _HTML)
        elif path == "/-/healthy":
            self._answer(200, b"Healthy\n", _TEXT)
        elif path == "/-/ready":
            self._answer(200, b"Ready\n", _TEXT)
        else:
            self._answer(404, b"Not found. Metrics are at /metrics\n", _TEXT)

    def _scrape(self, exporter: Exporter, target: str | None) -> None:
        try:
            body, content_type = exporter.metrics(
                self.headers.get("Accept"),
                self.headers.get("X-Prometheus-Scrape-Timeout-Seconds"),
                target,
            )
        except UnknownTargetError:
            # The name is not echoed: it is the caller's input, and may be anything.
            self._answer(400, b"Unknown target: not one of the configured targets\n", _TEXT)
            return
        except Exception:
            # Upstream faults never get here (the collector answers them); this is a bug.
            log.exception("scrape failed on an internal error")
            self._answer(500, b"Internal error, see the exporter's log\n", _TEXT)
            return
        self._answer(200, body, content_type)

    def _answer(
        self,
        status: int,
        body: bytes | list[bytes],
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        chunks = [body] if isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(map(len, chunks))))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # The standard library logs every request to stderr; scrapes are not news.
        pass
