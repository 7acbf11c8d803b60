"""The upstream call: what it sends, the size cap, and a deadline over the whole exchange."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import respx

from exporter.client import Fetched, StatsClient, redact_url
from exporter.errors import FetchError, ParseError
from exporter.targets import Secret, Target

from samples import sample_bytes

URL = "http://api.test:3001/api/jobs/stats"


def fetch(client: StatsClient, timeout: float) -> Fetched:
    """One fetch, on a loop of its own."""
    return asyncio.run(client.fetch(timeout))


def target(url: str, max_body_size: int = 5 * 1024 * 1024) -> Target:
    return Target(name="test", url=url, timeout=10.0, max_body_size=max_body_size)


@pytest.fixture
def client() -> Iterator[StatsClient]:
    # respx's routes (those of the test's @respx.mock) answer in place of the network.
    routes = httpx.MockTransport(respx.mock.async_handler)
    stats_client = StatsClient(target(URL, max_body_size=64 * 1024), transport=routes)
    yield stats_client
    asyncio.run(stats_client.close())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@host:3001/api/jobs/stats?token=t#x", "http://host:3001/api/jobs/stats"),
        ("https://host/api", "https://host/api"),
        ("http://[::1]:3001/a", "http://[::1]:3001/a"),
    ],
)
def test_redact_url_drops_credentials_and_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@respx.mock
def test_fetch_sends_one_get_asking_for_json(client: StatsClient) -> None:
    route = respx.get(URL).respond(200, content=sample_bytes("enabled"))
    assert fetch(client, 5).body == sample_bytes("enabled")
    assert route.call_count == 1
    request = route.calls.last.request
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"].startswith("jobstats-exporter/")


@respx.mock
def test_declared_length_over_the_cap_is_too_large(client: StatsClient) -> None:
    respx.get(URL).respond(200, content=b"x" * (64 * 1024 + 1))
    with pytest.raises(FetchError) as caught:
        fetch(client, 5)
    assert caught.value.reason == "too_large"


@respx.mock
def test_compressed_body_is_capped_after_decompression(client: StatsClient) -> None:
    bomb = gzip.compress(b" " * (10 * 1024 * 1024))
    respx.get(URL).mock(
        return_value=httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(bomb)
        )
    )
    assert len(bomb) < 64 * 1024
    with pytest.raises(FetchError) as caught:
        fetch(client, 5)
    assert caught.value.reason == "too_large"


@respx.mock
def test_corrupt_compressed_body_is_invalid_json(client: StatsClient) -> None:
    respx.get(URL).mock(
        return_value=httpx.Response(
            200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
        )
    )
    with pytest.raises(ParseError) as caught:
        fetch(client, 5)
    assert caught.value.reason == "invalid_json"


@pytest.mark.parametrize("status", [201, 204])
@respx.mock
def test_any_2xx_is_read(client: StatsClient, status: int) -> None:
    respx.get(URL).respond(status, content=b"{}")
    assert fetch(client, 5).body == b"{}"


@pytest.mark.parametrize("status", [301, 400, 401, 404, 500, 502, 503, 504])
@respx.mock
def test_other_statuses_are_http_status_and_name_the_code(client: StatsClient, status: int) -> None:
    respx.get(URL).respond(status, content=sample_bytes("enabled"))
    with pytest.raises(FetchError) as caught:
        fetch(client, 5)
    assert caught.value.reason == "http_status"
    assert f"HTTP status {status}" in str(caught.value)


def test_a_trickling_body_still_times_out() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        # Each byte comes well within the timeout; the whole never does.
        for _ in range(1000):
            await asyncio.sleep(0.05)
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    stats_client = StatsClient(target(URL), transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(FetchError) as caught:
            fetch(stats_client, 0.3)
    finally:
        asyncio.run(stats_client.close())
    assert caught.value.reason == "timeout"


def test_connection_refused_is_connect() -> None:
    stats_client = StatsClient(target("http://127.0.0.1:9/api/jobs/stats"))
    try:
        with pytest.raises(FetchError) as caught:
            fetch(stats_client, 2)
    finally:
        asyncio.run(stats_client.close())
    assert caught.value.reason == "connect"


def test_close_is_idempotent() -> None:
    stats_client = StatsClient(target(URL))
    asyncio.run(stats_client.close())
    asyncio.run(stats_client.close())


@respx.mock
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_a_failed_scrape_never_a_request_elsewhere(
    client: StatsClient, status: int
) -> None:
    elsewhere = respx.get("http://other.test/stats").respond(200, content=b"{}")
    respx.get(URL).respond(status, headers={"Location": "http://other.test/stats"})
    with pytest.raises(FetchError) as caught:
        fetch(client, 5)
    assert caught.value.reason == "http_status"
    assert f"HTTP status {status}" in str(caught.value)
    assert elsewhere.call_count == 0


def test_a_trickling_answer_is_given_up_by_the_request_itself() -> None:
    """The caller's deadline alone would leave the request running, holding a connection
    of the pool for as long as the upstream trickles."""
    given_up = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        try:
            for _ in range(1000):
                await asyncio.sleep(0.05)
                yield b" "
        finally:
            given_up.set()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    async def scrape() -> None:
        stats_client = StatsClient(target(URL), transport=httpx.MockTransport(handler))
        try:
            with pytest.raises(FetchError):
                await stats_client.fetch(0.3)
            async with asyncio.timeout(5):
                await given_up.wait()
        finally:
            await stats_client.close()

    asyncio.run(scrape())


def test_a_scrape_at_the_deadline_of_a_request_starts_a_new_one() -> None:
    """The request in flight is about to fail: a scrape arriving then must not share it."""
    answers = 0

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(1000):
            await asyncio.sleep(0.05)
            yield b" "

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answers
        answers += 1
        if answers == 1:
            return httpx.Response(200, content=trickle())
        return httpx.Response(200, content=b"{}")

    async def scrapes() -> Fetched:
        stats_client = StatsClient(target(URL), transport=httpx.MockTransport(handler))
        try:
            with pytest.raises(FetchError):
                await stats_client.fetch(0.3)
            return await stats_client.fetch(1.0)
        finally:
            await stats_client.close()

    assert asyncio.run(scrapes()).body == b"{}"
    assert answers == 2


def test_a_kept_alive_connection_the_upstream_reset_is_not_used_again() -> None:
    """A load balancer that resets idle connections: the next scrape connects anew."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    reset = threading.Event()
    accepted: list[int] = []

    def serve() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            accepted.append(1)
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            if len(accepted) == 1:
                # Kept alive by the client; reset by "the load balancer".
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
                reset.set()
            else:
                connection.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def scrapes() -> list[bytes]:
        stats_client = StatsClient(target(f"http://127.0.0.1:{port}/stats"))
        try:
            first = await stats_client.fetch(5)
            await asyncio.to_thread(reset.wait, 5)
            return [first.body, (await stats_client.fetch(5)).body]
        finally:
            await stats_client.close()

    try:
        assert asyncio.run(scrapes()) == [b"{}", b"{}"]
    finally:
        listener.close()
        server.join(5)
    assert len(accepted) == 2


def test_a_token_the_http_parser_refuses_fails_the_scrape_without_showing_it() -> None:
    """A bearer token ending in a space (h11 refuses such a header value): a failed scrape
    that names the kind of error, never a traceback or the token."""
    listener = socket.create_server(("127.0.0.1", 0))  # the kernel accepts for it
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/stats"
    token = Secret("variable TOKEN", value="tok3n ")
    stats_client = StatsClient(
        Target(name="test", url=url, timeout=5.0, max_body_size=1024, bearer_token=token)
    )
    try:
        with pytest.raises(FetchError) as caught:
            fetch(stats_client, 2)
    finally:
        asyncio.run(stats_client.close())
        listener.close()
    assert caught.value.reason == "connect"
    assert "LocalProtocolError" in str(caught.value)
    assert "tok3n" not in str(caught.value)
