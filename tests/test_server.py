"""The HTTP side: endpoints, keep-alive, content negotiation and the scrape deadline."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import http.client
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter import protocol
from exporter.config import Config
from exporter.protocol import Acceptor, ConnectionLimits, Connections, Request, Response
from exporter.server import (
    Exporter,
    MetricsServer,
    escape_html,
    scrape_timeout,
    wants_openmetrics,
)
from exporter.webconfig import WebConfig

from samples import sample_bytes

Handler = Callable[[httpx.Request], httpx.Response]
T = TypeVar("T")


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
    """An exporter served on 127.0.0.1 in this process, its upstream faked by `handler`.

    Its loop runs in a thread of its own, so the test's plain blocking clients can call it.
    """

    def __init__(
        self,
        handler: Handler | Callable[[httpx.Request], object],
        config: Config,
        web: WebConfig | None = None,
        limits: ConnectionLimits = ConnectionLimits(),  # noqa: B008 - frozen
    ):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.exporter = Exporter(config, transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
        self.server = MetricsServer(self.exporter, "127.0.0.1:0", web, limits)
        self.run(self.server.start())
        self.host, port = self.server.url.rsplit("//", 1)[1].rsplit(":", 1)
        self.port = int(port)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

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
        self.run(self.server.close(grace=1))
        self.run(self.exporter.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(
        handler: Handler,
        config: Config | None = None,
        web: WebConfig | None = None,
        limits: ConnectionLimits = ConnectionLimits(),  # noqa: B008 - frozen
    ) -> Running:
        started.append(Running(handler, config or Config(), web, limits))
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


@given(st.text(alphabet=st.sampled_from("&<>\"'a é\u2028") | st.characters()))
def test_escape_html_is_html_escape(text: str) -> None:
    assert escape_html(text) == html.escape(text)


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


# /probe


def two_targets() -> Config:
    from exporter.targets import Target

    return Config(
        configured_targets=(
            Target(name="shop", url="http://api.test/shop", timeout=5.0, max_body_size=1 << 20),
            Target(name="admin", url="http://api.test/admin", timeout=5.0, max_body_size=1 << 20),
        )
    )


def by_path(request: httpx.Request) -> httpx.Response:
    """The shop's API answers the sample, the admin's a 503: the two are told apart."""
    if request.url.path == "/shop":
        return httpx.Response(200, content=sample_bytes("enabled"))
    return httpx.Response(503)


def test_probe_scrapes_the_named_target_and_metrics_the_first(
    running: Callable[..., Running],
) -> None:
    exporter = running(by_path, two_targets())
    assert value(exporter.get("/probe?target=shop")[2], "jobstats_up") == 1
    assert value(exporter.get("/probe?target=admin")[2], "jobstats_up") == 0
    assert value(exporter.get("/metrics")[2], "jobstats_up") == 1


@pytest.mark.parametrize(
    "query", ["", "?target=", "?target=shop&target=admin", "?module=shop", "?target=nope"]
)
def test_probe_needs_one_configured_target_and_never_echoes_it(
    running: Callable[..., Running], query: str
) -> None:
    status, _, body = running(by_path, two_targets()).get(f"/probe{query}")
    assert status == 400
    assert "nope" not in body


# Connections


def raw_connection(exporter: Running) -> socket.socket:
    return socket.create_connection((exporter.host, exporter.port), timeout=10)


def exchange(exporter: Running, data: bytes) -> bytes:
    """Send `data` on a new connection; everything received until the server closes it."""
    received = b""
    with raw_connection(exporter) as connection:
        connection.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    return received


def closed_by_server(connection: socket.socket) -> bool:
    """True when the server ends the connection (EOF or reset) before the socket's timeout."""
    try:
        while connection.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_a_request_not_sent_in_time_is_dropped(running: Callable[..., Running]) -> None:
    exporter = running(enabled, limits=ConnectionLimits(request_timeout=0.3))
    with raw_connection(exporter) as half:
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(half)
    with raw_connection(exporter) as silent:
        assert closed_by_server(silent)
    assert exporter.get("/-/healthy")[0] == 200


def test_a_trickled_request_is_dropped_at_the_deadline_however_busy_it_looks(
    running: Callable[..., Running],
) -> None:
    """After a first answer the connection idles; the first byte of the next request
    starts the request deadline, which each later byte does not push back."""
    exporter = running(enabled, limits=ConnectionLimits(request_timeout=0.5, idle_timeout=60))
    with raw_connection(exporter) as trickle:
        trickle.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert trickle.recv(65536).startswith(b"HTTP/1.1 200 OK")
        trickle.settimeout(0.2)
        sent = 0
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            try:
                if trickle.recv(1) == b"":
                    break
            except TimeoutError:
                continue
        # 0.2 s per byte: the 0.5 s deadline falls within the first few.
        assert sent < 20


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled, limits=ConnectionLimits(idle_timeout=0.3))
    connection = exporter.connection()
    connection.request("GET", "/-/healthy")
    response = connection.getresponse()
    assert response.read() == b"Healthy\n"
    assert response.getheader("Connection") is None  # kept alive
    assert connection.sock is not None
    assert closed_by_server(connection.sock)
    connection.close()


def test_past_the_cap_new_connections_are_closed_and_open_ones_keep_working(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled, limits=ConnectionLimits(max_connections=2))
    first, second = exporter.connection(), exporter.connection()
    try:
        for connection in (first, second):
            connection.request("GET", "/-/healthy")
            assert connection.getresponse().read() == b"Healthy\n"
        with raw_connection(exporter) as third:
            with contextlib.suppress(OSError):
                third.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = third.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
        for connection in (first, second):
            connection.request("GET", "/metrics")
            assert b"jobstats_up 1.0" in connection.getresponse().read()
    finally:
        first.close()
        second.close()
    # Once they are gone, there is room again.
    wait_for(lambda: exporter.server.connections == 0)
    assert exporter.get("/-/healthy")[0] == 200


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_pipelined_requests_are_answered_in_order(running: Callable[..., Running]) -> None:
    exporter = running(enabled)
    received = exchange(
        exporter,
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1.1 (\d+)", received) == [b"200", b"200", b"404"]
    assert received.index(b"Healthy") < received.index(b"Ready")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
        (
            b"POST /-/healthy HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"a" * 70_000,
            b"413",
        ),
    ],
)
def test_a_bad_or_oversized_request_is_refused_and_the_connection_closed(
    running: Callable[..., Running], request_bytes: bytes, status: bytes
) -> None:
    with raw_connection(running(enabled)) as connection:
        with contextlib.suppress(OSError):
            connection.sendall(request_bytes)
        answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 " + status)
        assert closed_by_server(connection)


@pytest.mark.parametrize(("method", "path"), [("POST", "/metrics"), ("DELETE", "/"), ("PUT", "/")])
def test_other_methods_are_not_allowed(
    running: Callable[..., Running], method: str, path: str
) -> None:
    connection = running(enabled).connection()
    try:
        connection.request(method, path)
        response = connection.getresponse()
        response.read()
        assert response.status == 405
        assert response.getheader("Allow") == "GET, HEAD"
    finally:
        connection.close()


def test_http_1_0_gets_its_answer_and_the_connection_closes(
    running: Callable[..., Running],
) -> None:
    received = exchange(running(enabled), b"GET /-/healthy HTTP/1.0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert received.endswith(b"Healthy\n")


# Basic auth, in the process


def test_basic_auth_guards_every_path_but_health_and_takes_any_case_of_basic(
    running: Callable[..., Running],
) -> None:
    import base64

    import bcrypt

    web = WebConfig(users={"prom": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))})
    exporter = running(enabled, web=web)
    good = base64.b64encode(b"prom:s3cret").decode()
    assert exporter.get("/metrics")[0] == 401
    assert exporter.get("/metrics", {"Authorization": f"Basic {good}"})[0] == 200
    assert exporter.get("/probe?target=default", {"Authorization": f"basic {good}"})[0] == 200
    wrong = base64.b64encode(b"prom:nope").decode()
    assert exporter.get("/", {"Authorization": f"basic {wrong}"})[0] == 401
    assert exporter.get("/-/healthy")[0] == 200


# Reload, in the process


def test_a_reload_keeps_the_tailer_and_client_of_an_unchanged_target_and_closes_the_rest() -> None:
    from exporter.model import Limits
    from exporter.targets import RedisSource, Target

    def target(name: str, url: str) -> Target:
        return Target(
            name=name,
            url=url,
            timeout=5.0,
            max_body_size=1 << 20,
            redis=RedisSource(url="redis://127.0.0.1:9/0"),
        )

    shop, admin = target("shop", "http://api.test/shop"), target("admin", "http://api.test/admin")

    async def reloads() -> None:
        exporter = Exporter(Config(configured_targets=(shop, admin)), tail=True)
        before = {name: exporter._state(name) for name in ("shop", "admin")}
        assert before["shop"].tailer is not None  # its event counters live in it
        moved = target("admin", "http://api.test/admin-v2")
        rebuilt = await exporter.reload(Config(configured_targets=(shop, moved)))
        assert rebuilt == ["admin"]
        assert exporter._state("shop") is before["shop"]
        assert exporter._state("admin") is not before["admin"]
        # Other limits change how a tailer reads: every tailer is then built anew.
        rebuilt = await exporter.reload(
            Config(configured_targets=(shop, moved), limits=Limits(max_queues=5))
        )
        assert rebuilt == ["shop", "admin"]
        await exporter.close()

    asyncio.run(reloads())


def small_window_connection(exporter: Running) -> socket.socket:
    """A connection whose client takes 4 KiB at a time: the server's writes back up."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(10)
    connection.connect((exporter.host, exporter.port))
    return connection


def test_a_client_that_leaves_its_answers_unread_is_dropped(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled, limits=ConnectionLimits(write_stall_timeout=0.3))
    with small_window_connection(exporter) as connection:
        asked = 200
        connection.sendall(b"GET /runbooks HTTP/1.1\r\nHost: x\r\n\r\n" * asked)
        wait_for(lambda: exporter.server.connections == 1)
        # Nothing is read meanwhile: the answers pile up until the server gives up.
        wait_for(lambda: exporter.server.connections == 0)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    assert 0 < received.count(b"HTTP/1.1 200 OK") < asked


def test_a_client_that_reads_late_still_gets_every_answer_whole(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled, limits=ConnectionLimits(write_stall_timeout=5.0))
    asked = 200
    with small_window_connection(exporter) as connection:
        connection.sendall(b"GET /runbooks HTTP/1.1\r\nHost: x\r\n\r\n" * (asked - 1))
        connection.sendall(b"GET /runbooks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # Unread for a while: the server's writes pause, then resume as the client reads.
        time.sleep(0.5)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    page = exporter.server.exporter.runbooks_page
    assert received.count(b"HTTP/1.1 200 OK") == asked
    assert received.count(page) == asked


def hold_the_loop(exporter: Running, seconds: float) -> None:
    """Keep the exporter's loop busy for `seconds` (as a burst of work would), from now."""
    holding = threading.Event()

    def hold() -> None:
        holding.set()
        time.sleep(seconds)

    exporter.loop.call_soon_threadsafe(hold)
    assert holding.wait(5)


def test_under_a_backlog_the_newest_connection_is_served_first(
    running: Callable[..., Running],
) -> None:
    exporter = running(enabled)
    flood: list[socket.socket] = []
    try:
        hold_the_loop(exporter, 1.0)
        # Queued in the kernel meanwhile: 400 half requests, then one whole.
        for _ in range(400):
            connection = socket.create_connection((exporter.host, exporter.port), timeout=10)
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            flood.append(connection)
        with socket.create_connection((exporter.host, exporter.port), timeout=10) as scrape:
            scrape.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = scrape.recv(65536)
            set_up_by_then = exporter.server.connections
    finally:
        for connection in flood:
            connection.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    # Oldest first, all 400 would have been set up before it.
    assert set_up_by_then < 200


def test_connections_left_waiting_past_the_request_deadline_are_closed_unserved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(protocol, "SETUP_BATCH", 2)

    async def handle(request: Request) -> Response:
        return Response(200, b"ok\n", "text/plain")

    async def flood() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        ahead = 0.0
        clock = loop.time
        monkeypatch.setattr(loop, "time", lambda: clock() + ahead)
        connections = Connections(handle, "test", ConnectionLimits(request_timeout=1.0))
        acceptor = Acceptor(connections)
        listener = socket.create_server(("127.0.0.1", 0), backlog=100)
        clients = [socket.create_connection(listener.getsockname()[:2]) for _ in range(40)]
        try:
            acceptor.start([listener])
            while acceptor.waiting == 0:
                await asyncio.sleep(0)
            ahead = 5.0  # all those accepted are now past the deadline
            while acceptor.waiting:
                await asyncio.sleep(0.01)
            closed = 0
            for client in clients:
                client.settimeout(5)
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    closed += client.recv(100) == b""
            return len(connections.open), closed, acceptor.waiting
        finally:
            acceptor.close()
            await connections.close(0)
            for client in clients:
                client.close()

    served, closed, waiting = asyncio.run(flood())
    assert served <= 4  # set up before the deadline passed: two a turn
    assert closed == 40 - served
    assert waiting == 0


def test_out_of_file_descriptors_accepting_pauses_and_resumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(protocol, "ACCEPT_RETRY_DELAY", 0.2)

    class Exhausted(socket.socket):
        """A listening socket whose first accept() finds no file descriptor left."""

        failed = False

        def accept(self) -> tuple[socket.socket, Any]:
            if not Exhausted.failed:
                Exhausted.failed = True
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def handle(request: Request) -> Response:
        return Response(200, b"ok\n", "text/plain")

    async def accept_after_the_pause() -> bytes:
        connections = Connections(handle, "test", ConnectionLimits())
        acceptor = Acceptor(connections)
        listener = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        try:
            acceptor.start([listener])
            reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(5):
                    return await reader.read()
            finally:
                writer.close()
                await writer.wait_closed()
        finally:
            acceptor.close()
            await connections.close(0)

    with caplog.at_level("ERROR", logger="jobstats_exporter"):
        answer = asyncio.run(accept_after_the_pause())
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert [r.getMessage() for r in caplog.records] == [
        "cannot accept connections: retrying in a second"
    ]


def test_the_listen_backlog_is_4096_not_the_accept_batch(running: Callable[..., Running]) -> None:
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("no ss (iproute2) to read the backlog with")
    exporter = running(enabled)
    listing = subprocess.run(
        [ss, "-ltnH", f"sport = :{exporter.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    # LISTEN, Recv-Q (waiting now), Send-Q (the backlog), local address, peer address
    assert listing[2] == str(min(4096, int(Path("/proc/sys/net/core/somaxconn").read_text())))


# Found in review: each pinned


def test_a_header_that_never_ends_is_refused_before_it_grows(
    running: Callable[..., Running],
) -> None:
    with raw_connection(running(enabled)) as connection:
        with contextlib.suppress(OSError):
            connection.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 300_000)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431")


def test_bytes_after_a_connection_close_request_do_not_lose_its_answer(
    running: Callable[..., Running],
) -> None:
    received = exchange(
        running(enabled),
        b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        b"GET /-/ready HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert re.findall(rb"HTTP/1.1 (\d+)", received) == [b"200"]
    assert received.endswith(b"Healthy\n")


def test_garbage_after_a_good_request_ends_the_connection_after_its_answer(
    running: Callable[..., Running],
) -> None:
    received = exchange(
        running(enabled), b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01 NOT HTTP\r\n\r\n"
    )
    assert re.findall(rb"HTTP/1.1 (\d+)", received) == [b"200"]


def test_head_gets_the_headers_of_get_and_no_body(running: Callable[..., Running]) -> None:
    received = exchange(
        running(enabled),
        b"HEAD /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /-/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 8" in head
    # No body after the first headers: the next answer follows at once.
    assert rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"Ready\n")


def test_a_malformed_request_target_is_400_not_an_internal_error(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    with raw_connection(running(enabled)) as connection:
        connection.sendall(b"GET http://[x/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")
    assert "Traceback" not in caplog.text


def big_answer(queues: int) -> Handler:
    document = {
        "success": True,
        "stats": {
            f"queue-{index:05d}": {
                "waiting": 1,
                "active": 0,
                "completed": 2,
                "failed": 0,
                "delayed": 0,
                "status": "active",
            }
            for index in range(queues)
        },
    }
    body = json.dumps(document).encode()
    return lambda request: httpx.Response(200, content=body)


def test_a_client_that_leaves_mid_answer_is_not_written_to_any_more(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(api_max_body_size=64 * 1024 * 1024)
    exporter = running(big_answer(5_000), config)
    for _ in range(3):
        connection = small_window_connection(exporter)
        connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 200")
        # Leave with the answer unread: the kernel resets the connection.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
    wait_for(lambda: exporter.server.connections == 0)
    assert "socket.send() raised exception" not in caplog.text


def test_a_scrape_in_flight_when_a_reload_removes_its_target_still_gets_its_answer(
    running: Callable[..., Running],
) -> None:
    from exporter.targets import Target

    released = threading.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.to_thread(released.wait, 10)
        return httpx.Response(200, content=sample_bytes("enabled"))

    def targets(*names: str) -> Config:
        return Config(
            configured_targets=tuple(
                Target(
                    name=name, url=f"http://api.test/{name}", timeout=10.0, max_body_size=1 << 20
                )
                for name in names
            )
        )

    exporter = running(slow, targets("a", "b"))
    answers: list[tuple[int, str, str]] = []
    scrape = threading.Thread(target=lambda: answers.append(exporter.get("/probe?target=b")))
    scrape.start()
    wait_for(lambda: bool(exporter.exporter.client_for("b")._inflight))
    exporter.run(exporter.exporter.reload(targets("a")))
    released.set()
    scrape.join(10)
    assert [status for status, _, _ in answers] == [200]
    assert value(answers[0][2], "jobstats_up") == 1
    assert exporter.get("/probe?target=b")[0] == 400
