"""Serve /metrics, /probe, the runbooks, a landing page and health endpoints over HTTP/1.1.

One `Exporter` holds what lives between scrapes (one client per target, the
cron cache, error counters, the last answer's memo); each scrape gets its own
collector, bound to that scrape's target and timeout, so /metrics and /probe
share one code path. /probe only takes the name of a configured target: it never fetches a
URL it is given. One asyncio loop serves HTTP (protocol.py), runs the upstream
requests and the Redis tailers; TLS and basic auth come from the web config
file. /runbooks serves the alerts' runbooks, so the rules' links resolve
wherever Prometheus reaches the exporter. POST /-/reload and SIGHUP re-read
the config; targets that did not change keep their state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx

from . import __version__
from .client import StatsClient, redact_url
from .collector import (
    AnswerMemo,
    JobStatsCollector,
    ScrapeErrors,
    render_chunks,
)
from .config import Config, parse_listen_address
from .errors import ConfigError
from .exposition import openmetrics
from .logs import configure_logging
from .process import ProcessMetrics
from .protocol import Acceptor, ConnectionLimits, Connections, Request, Response
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
#: Seconds a client has to finish the TLS handshake (then protocol.py's deadlines apply).
HANDSHAKE_TIMEOUT = 10.0
#: Connections the kernel may hold for us before they are accepted (it caps this at somaxconn).
LISTEN_BACKLOG = 4096
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
#: What html.escape replaces, as a table: the html package, whose entity tables load with
#: it, would cost a running exporter 340 KiB for a landing page.
_HTML_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
)
#: The Prometheus text exposition format, as every Prometheus version reads it.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
#: Paths answered without credentials: they tell nothing but that the process runs.
_OPEN_PATHS = ("/-/healthy", "/-/ready")

log = logging.getLogger("jobstats_exporter")


def escape_html(text: str) -> str:
    """html.escape(text, quote=True)."""
    return text.translate(_HTML_ESCAPES)


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


@dataclass(slots=True)
class _TargetState:
    target: Target
    #: The stats API's client; None for a target read from its Redis source alone.
    client: StatsClient | None
    errors: ScrapeErrors
    #: The tailer of the target's BullMQ Redis, and its task once started; None without one.
    tailer: Tailer | None = None
    task: asyncio.Task[None] | None = None
    #: The last answer, parsed and rendered, for the next scrape to reuse what did not change.
    memo: AnswerMemo = dataclasses.field(default_factory=AnswerMemo)

    def start(self) -> None:
        if self.tailer is not None and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.tailer.run())
            self.task.add_done_callback(_report_crash)

    async def close(self, retire: bool = False) -> None:
        """Stop tailing and release the client; `retire`: let the request in flight, which
        scrapes may be waiting for, end first (a target replaced by a reload)."""
        if self.task is not None:
            self.task.cancel()
        if self.tailer is not None:
            await self.tailer.close()
        if self.client is not None:
            await (self.client.retire() if retire else self.client.close())


class Exporter:
    """The exporter's long-lived parts, built from a Config.

    `start()` starts the Redis tailers on the running loop, `close()` stops
    everything; `metrics()` is one scrape. `reload()` takes a new Config.
    """

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
        self._transport = transport
        self._tail = tail
        self._started = False
        #: Targets replaced by a reload, closing once their requests in flight end.
        self._retiring: set[asyncio.Task[None]] = set()
        self._targets = {target.name: self._target_state(target) for target in config.targets}
        self.default_target = config.targets[0].name
        self._process = ProcessMetrics()

    def _target_state(self, target: Target) -> _TargetState:
        client = StatsClient(target, self._transport) if target.url else None
        if target.redis is None or not self._tail:
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
        return _TargetState(target, client, ScrapeErrors(), tailer)

    async def start(self) -> None:
        """Start tailing every Redis source, on the running loop."""
        self._started = True
        for state in self._targets.values():
            state.start()

    async def reload(self, config: Config) -> list[str]:
        """Serve `config` from now on; the names of the targets built anew.

        A target whose settings did not change keeps its client (and its keep-alive
        connections and shared requests), its error counters and its tailer. A replaced
        one is closed in the background, once its request in flight has ended. Nothing
        here awaits: a reload is applied whole.
        """
        old = self._targets
        kept_limits = config.limits == self.config.limits
        if config.cron_timezone != self.config.cron_timezone:
            self.schedules = CronSchedules(config.cron_timezone)
        self.config = config
        targets: dict[str, _TargetState] = {}
        rebuilt: list[str] = []
        for target in config.targets:
            state = old.get(target.name)
            if state is not None and state.target == target and (kept_limits or not state.tailer):
                targets[target.name] = state
                continue
            targets[target.name] = self._target_state(target)
            rebuilt.append(target.name)
            if self._started:
                targets[target.name].start()
        self._targets = targets
        self.default_target = config.targets[0].name
        for name, state in old.items():
            if targets.get(name) is not state:
                # In the background: the reload does not wait for a slow upstream.
                retiring = asyncio.get_running_loop().create_task(state.close(retire=True))
                self._retiring.add(retiring)
                retiring.add_done_callback(self._retiring.discard)
        return rebuilt

    def client_for(self, target: str | None) -> StatsClient | None:
        """The stats API client of `target` (default: the first), None when it has no API;
        UnknownTargetError if there is no such target."""
        return self._state(target).client

    def _state(self, target: str | None) -> _TargetState:
        state = self._targets.get(target or self.default_target)
        if state is None:
            raise UnknownTargetError(target)
        return state

    def _collector(
        self, state: _TargetState, timeout: float, memo: AnswerMemo | None
    ) -> JobStatsCollector:
        return JobStatsCollector(
            state.client,
            timeout,
            self.schedules,
            state.errors,
            self.config.limits,
            self.clock,
            redis_view=state.tailer.view if state.tailer is not None else None,
            memo=memo,
        )

    async def metrics(
        self, accept: str | None, timeout_header: str | None, target: str | None = None
    ) -> tuple[list[bytes | bytearray], str]:
        """The exposition, in chunks, and its content type, for one scrape.

        UnknownTargetError when `target` is not configured.
        """
        state = self._state(target)
        timeout = scrape_timeout(state.target.timeout, timeout_header)
        as_openmetrics = wants_openmetrics(accept)
        # OpenMetrics needs rows, not rendered lines: it is built afresh.
        collector = self._collector(state, timeout, None if as_openmetrics else state.memo)
        families = await collector.families()
        families.extend(self._process.families())
        if as_openmetrics:
            body, content_type = openmetrics(families, accept or "")
            return [body], content_type
        # The text format, written directly: what generate_latest writes, without its cost.
        return render_chunks(families), TEXT_FORMAT

    @functools.cached_property
    def runbooks_page(self) -> bytes:
        """The runbooks as HTML: read and rendered on the first request, then kept."""
        # Imported here: the renderer and the html package it needs cost a running exporter
        # half a MiB that only a runbook reader asks for.
        from .runbooks import read_runbooks, render_page

        return render_page(read_runbooks())

    def landing_page(self) -> bytes:
        rows = "\n".join(
            f'<li><a href="/probe?target={escape_html(name)}">{escape_html(name)}</a>:'
            f" <code>{escape_html(source_of(state.target))}</code></li>"
            for name, state in self._targets.items()
        )
        default = escape_html(self.default_target)
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
<p>Version {escape_html(__version__)}</p>
</body></html>
""".encode()

    async def close(self) -> None:
        for retiring in list(self._retiring):
            retiring.cancel()
        for state in self._targets.values():
            await state.close()


def source_of(target: Target) -> str:
    """Where a target's stats come from, without credentials: for pages and logs."""
    if target.url is not None:
        return redact_url(target.url)
    assert target.redis is not None
    from .bullmq import where

    return f"{where(target.redis)} (BullMQ's Redis only)"


def _report_crash(task: asyncio.Task[None]) -> None:
    """A tailer ends only when cancelled; any other end is a bug, logged with its traceback."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("redis source stopped on an internal error", exc_info=error)


class MetricsServer:
    """The exporter's HTTP side on the running loop, with optional TLS and basic auth.

    `load`, when given, re-reads the config files for POST /-/reload and `reload()`.
    """

    def __init__(
        self,
        exporter: Exporter,
        address: str,
        web: WebConfig | None = None,
        limits: ConnectionLimits = ConnectionLimits(),  # noqa: B008 - frozen
        load: Callable[[], tuple[Config, WebConfig | None]] | None = None,
    ) -> None:
        self.exporter = exporter
        self.address = address
        self.web = web or WebConfig()
        self._load = load
        self._connections = Connections(self._handle, f"jobstats-exporter/{__version__}", limits)
        self._server: asyncio.Server | None = None
        self._acceptor: Acceptor | None = None

    async def start(self) -> None:
        """Listen; OSError when the address cannot be had."""
        host, port = parse_listen_address(self.address)
        ssl_context = self.web.ssl_context() if self.web.tls else None
        # asyncio makes the listening sockets (resolving the host, IPv4 and IPv6 where it
        # is empty) but does not accept on them: the Acceptor does, newest first.
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocol,
            host or None,
            port,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
            reuse_address=True,
            start_serving=False,
        )
        listeners = []
        for listening in self._server.sockets:
            # A duplicate of each: asyncio's wrapper offers neither accept() nor listen().
            listener = socket.fromfd(listening.fileno(), listening.family, listening.type)
            listener.listen(LISTEN_BACKLOG)
            listeners.append(listener)
        self._acceptor = Acceptor(self._connections, ssl_context, HANDSHAKE_TIMEOUT)
        self._acceptor.start(listeners)

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        # Listening everywhere means an IPv4 and an IPv6 socket: show the IPv4 one, as before.
        sockets = sorted(self._server.sockets, key=lambda each: each.family != socket.AF_INET)
        host, port = sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.web.tls else "http"
        return f"{scheme}://{shown}:{port}"

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections.open)

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening; let requests in progress finish within `grace` seconds."""
        if self._acceptor is not None:
            self._acceptor.close()
        if self._server is not None:
            self._server.close()
        await self._connections.close(grace)

    async def reload(self) -> None:
        """Re-read the config files and serve them; ConfigError, logged, and nothing
        changes, when they do not pass the check."""
        try:
            if self._load is None:
                raise ConfigError("reload: the exporter was not started from config files")
            config, web = self._load()
        except ConfigError as error:
            log.error("reload refused: the config keeps serving", extra={"err": str(error)})
            raise
        if config.web_listen_address != self.exporter.config.web_listen_address:
            log.warning(
                "reload: a new web.listen_address takes a restart",
                extra={"address": config.web_listen_address},
            )
            config = dataclasses.replace(
                config, web_listen_address=self.exporter.config.web_listen_address
            )
        web = web or WebConfig()
        if not web.same_tls(self.web):
            log.warning("reload: a new tls_server_config takes a restart; the users are reloaded")
            web = self.web.with_users(web.users)
        old = self.exporter.config
        if (config.log_level, config.log_format) != (old.log_level, old.log_format):
            configure_logging(config.log_level, config.log_format)
        # No await before the last of these: a reload applies whole, even when the client
        # that asked for it leaves, and two reloads cannot interleave.
        self.web = web
        rebuilt = await self.exporter.reload(config)
        log.info(
            "config reloaded",
            extra={
                "targets": ",".join(t.name for t in config.targets),
                "rebuilt": ",".join(rebuilt) or "none",
            },
        )

    # --- requests ----------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the client left: no one to answer
            # What the request waited on was cancelled, not the request: answer anyway.
            log.warning("request interrupted", extra={"path": request.target[:200]})
            return Response(503, b"Interrupted, try again\n", _TEXT)
        except Exception:
            log.exception("request failed on an internal error")
            return Response(500, b"Internal error, see the exporter's log\n", _TEXT)

    async def _route(self, request: Request) -> Response:
        try:
            url = urlsplit(request.target)
        except ValueError:
            return Response(400, b"Bad request target\n", _TEXT)
        path = url.path
        if path not in _OPEN_PATHS and not await self._authorized(
            request.headers.get("authorization")
        ):
            return Response(
                401,
                b"Unauthorized\n",
                _TEXT,
                {"WWW-Authenticate": 'Basic realm="jobstats-exporter"'},
            )
        if path == "/-/reload":
            if request.method != "POST":
                return Response(405, b"Use POST to reload\n", _TEXT, {"Allow": "POST"})
            try:
                await self.reload()
            except ConfigError as error:
                return Response(500, f"failed to reload config: {error}\n".encode(), _TEXT)
            return Response(200, b"Reloaded\n", _TEXT)
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"Method not allowed\n", _TEXT, {"Allow": "GET, HEAD"})
        exporter = self.exporter
        if path in ("/metrics", "/probe"):
            target = None
            if path == "/probe":
                names = parse_qs(url.query).get("target", [])
                if len(names) != 1 or not names[0]:
                    return Response(400, b"Give one target: /probe?target=NAME\n", _TEXT)
                target = names[0]
            return await self._scrape(request, target)
        if path == "/":
            return Response(200, exporter.landing_page(), _HTML)
        if path == "/runbooks":
            return Response(200, exporter.runbooks_page, _HTML)
        if path == "/-/healthy":
            return Response(200, b"Healthy\n", _TEXT)
        if path == "/-/ready":
            return Response(200, b"Ready\n", _TEXT)
        return Response(404, b"Not found. Metrics are at /metrics\n", _TEXT)

    async def _scrape(self, request: Request, target: str | None) -> Response:
        try:
            body, content_type = await self.exporter.metrics(
                request.headers.get("accept"),
                request.headers.get("x-prometheus-scrape-timeout-seconds"),
                target,
            )
        except UnknownTargetError:
            # The name is not echoed: it is the caller's input, and may be anything.
            return Response(400, b"Unknown target: not one of the configured targets\n", _TEXT)
        except Exception:
            # Upstream faults never get here (the collector answers them); this is a bug.
            log.exception("scrape failed on an internal error")
            return Response(500, b"Internal error, see the exporter's log\n", _TEXT)
        return Response(200, body, content_type)

    async def _authorized(self, header: str | None) -> bool:
        web = self.web
        known = web.remembered(header)
        if known is not None:
            return known
        # bcrypt is slow on purpose: checked on a worker thread, the loop keeps serving.
        return await asyncio.to_thread(web.authorized, header)
