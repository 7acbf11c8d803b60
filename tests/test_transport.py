"""The client's transport against a real socket: keep-alive, framing, errors and timeouts.

Each test's server is a thread on 127.0.0.1 that answers with bytes written by hand,
so every way an upstream may frame (or break) an answer is the one on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from exporter import transport as transport_module
from exporter.transport import StreamsTransport

#: What the server does with one request on one connection: the bytes to send back (a
#: list: sent a part at a time, 0.1 s apart), or None to close without answering.
Answer = Callable[[int, bytes], bytes | list[bytes] | None]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """Reads requests (headers only) and sends what `answer` gives, per connection."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self._answer = answer
        self._close_after = close_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        acceptor = threading.Thread(target=self._accept, daemon=True)
        acceptor.start()
        self._threads.append(acceptor)

    def url(self, path: str = "/stats") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            handler = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            handler.start()
            self._threads.append(handler)

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        with connection:
            pending = b""
            while not self._stop.is_set():
                while b"\r\n\r\n" not in pending:
                    try:
                        chunk = connection.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    pending += chunk
                request, _, pending = pending.partition(b"\r\n\r\n")
                self.requests += 1
                reply = self._answer(self.requests, request)
                if reply is None:
                    return
                for part in [reply] if isinstance(reply, bytes) else reply:
                    connection.sendall(part)
                    if part is not reply:
                        time.sleep(0.1)
                if self._close_after:
                    return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)


Serve = Callable[..., RawServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[RawServer] = []

    def start(answer: Answer, close_after: bool = False) -> RawServer:
        server = RawServer(answer, close_after)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def get(url: str, *, read: float = 5.0) -> httpx.Request:
    timeout = httpx.Timeout(5.0, read=read)
    return httpx.Request("GET", url, extensions={"timeout": timeout.as_dict()})


async def body_of(transport: StreamsTransport, url: str, *, read: float = 5.0) -> bytes:
    response = await transport.handle_async_request(get(url, read=read))
    try:
        return await response.aread()
    finally:
        await response.aclose()


def run_gets(url: str, count: int, *, pause: float = 0.0, read: float = 5.0) -> list[bytes]:
    """`count` GETs of `url`, one after another, through one transport."""

    async def gets() -> list[bytes]:
        pool = StreamsTransport(None, max_connections=4, max_keepalive=2)
        bodies = []
        try:
            for _ in range(count):
                bodies.append(await body_of(pool, url, read=read))
                await asyncio.sleep(pause)
        finally:
            await pool.aclose()
        return bodies

    return asyncio.run(gets())


def test_requests_one_after_another_share_one_connection(serve: Serve) -> None:
    server = serve(lambda _, request: OK)
    assert run_gets(server.url(), 3) == [b"{}"] * 3
    assert (server.connections, server.requests) == (1, 3)


def test_the_request_is_a_get_with_its_target_and_host(serve: Serve) -> None:
    seen: list[bytes] = []
    server = serve(lambda _, request: seen.append(request) or OK)
    run_gets(server.url("/api/jobs/stats?x=1"), 1)
    lines = seen[0].split(b"\r\n")
    assert lines[0] == b"GET /api/jobs/stats?x=1 HTTP/1.1"
    assert f"host: 127.0.0.1:{server.port}".encode() in [line.lower() for line in lines]


def test_an_answer_that_says_close_ends_its_connection(serve: Serve) -> None:
    server = serve(
        lambda _, request: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert run_gets(server.url(), 2) == [b"{}"] * 2
    assert server.connections == 2


def test_chunked_and_close_delimited_bodies_are_read_whole(serve: Serve) -> None:
    chunked = serve(
        lambda _, request: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
        )
    )
    until_close = serve(
        lambda _, request: b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200_000, close_after=True
    )
    assert run_gets(chunked.url(), 2) == [b'{"a": 1}'] * 2
    assert chunked.connections == 1
    # A body ended by the close: the connection cannot carry another request.
    assert run_gets(until_close.url(), 1) == [b"x" * 200_000]


def test_an_informational_answer_is_passed_over(serve: Serve) -> None:
    server = serve(lambda _, request: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert run_gets(server.url(), 2) == [b"{}"] * 2
    assert server.connections == 1


def test_a_body_left_unread_closes_its_connection(serve: Serve) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300_000
    server = serve(lambda _, request: big)

    async def leave_one_unread() -> int:
        pool = StreamsTransport(None, max_connections=4, max_keepalive=2)
        try:
            response = await pool.handle_async_request(get(server.url()))
            await response.aclose()  # not read: its rest would be the next answer's start
            return len(await body_of(pool, server.url()))
        finally:
            await pool.aclose()

    assert asyncio.run(leave_one_unread()) == 300_000
    assert server.connections == 2


def test_bytes_past_the_answer_are_not_read_as_the_next_one(serve: Serve) -> None:
    stale = b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"stale"'
    server = serve(lambda number, request: OK + stale if number == 1 else OK)
    assert run_gets(server.url(), 2) == [b"{}"] * 2
    assert server.connections == 2


def test_a_long_header_arriving_in_pieces_is_read(serve: Serve) -> None:
    cookie = b"Set-Cookie: a=" + b"x" * 20_000 + b"\r\n"
    server = serve(
        lambda _, request: [b"HTTP/1.1 200 OK\r\n" + cookie[:18_000], cookie[18_000:] + OK[17:]]
    )
    assert run_gets(server.url(), 1) == [b"{}"]


def test_a_header_value_h11_refuses_is_an_httpx_error_not_a_crash(serve: Serve) -> None:
    server = serve(lambda _, request: OK)

    async def send() -> None:
        pool = StreamsTransport(None, max_connections=4, max_keepalive=2)
        request = get(server.url())
        request.headers["Authorization"] = "Bearer tok3n "  # a trailing space
        try:
            await pool.handle_async_request(request)
        finally:
            await pool.aclose()

    with pytest.raises(httpx.LocalProtocolError):
        asyncio.run(send())


def test_the_host_is_reached_as_httpx_encodes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    reached: list[str] = []

    async def open_connection(host: str, port: int, **options: object) -> None:
        reached.append(host)
        raise OSError("not here")

    monkeypatch.setattr(transport_module.asyncio, "open_connection", open_connection)
    with pytest.raises(httpx.ConnectError):
        run_gets("http://straße.test/stats", 1)
    # IDNA 2008, as in httpx's Host header; Python's idna codec would say strasse.test.
    assert reached == ["xn--strae-oqa.test"]


def test_a_connection_idle_too_long_is_not_used_again(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport_module, "KEEPALIVE_EXPIRY", 0.1)
    server = serve(lambda _, request: OK)
    assert run_gets(server.url(), 2, pause=0.3) == [b"{}"] * 2
    assert server.connections == 2


def test_a_server_that_closes_without_answering_is_a_remote_protocol_error(
    serve: Serve,
) -> None:
    server = serve(lambda _, request: None)
    with pytest.raises(httpx.RemoteProtocolError):
        run_gets(server.url(), 1)


def test_a_body_cut_short_is_a_remote_protocol_error(serve: Serve) -> None:
    cut = serve(lambda _, request: OK[:-1], close_after=True)
    with pytest.raises(httpx.RemoteProtocolError):
        run_gets(cut.url(), 1)


def test_a_body_that_stops_coming_is_a_read_timeout(serve: Serve) -> None:
    # The server keeps the connection open: h11 waits for the 8 bytes still due.
    server = serve(lambda _, request: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    with pytest.raises(httpx.ReadTimeout):
        run_gets(server.url(), 1, read=0.2)


def test_garbage_for_an_answer_is_a_remote_protocol_error(serve: Serve) -> None:
    server = serve(lambda _, request: b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    with pytest.raises(httpx.RemoteProtocolError):
        run_gets(server.url(), 1)


def test_an_answer_that_never_comes_is_a_read_timeout(serve: Serve) -> None:
    released = threading.Event()
    server = serve(lambda _, request: released.wait(5) and None)
    try:
        with pytest.raises(httpx.ReadTimeout):
            run_gets(server.url(), 1, read=0.2)
    finally:
        released.set()


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        run_gets(f"http://127.0.0.1:{port}/stats", 1)


def test_other_schemes_are_unsupported() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        run_gets("ftp://127.0.0.1/stats", 1)


def test_a_closed_transport_keeps_no_connection(serve: Serve) -> None:
    server = serve(lambda _, request: OK)

    async def close_mid_answer() -> list[bytes]:
        pool = StreamsTransport(None, max_connections=4, max_keepalive=2)
        response = await pool.handle_async_request(get(server.url()))
        await pool.aclose()
        bodies = [await response.aread()]
        await response.aclose()
        # Served still, each on a connection closed after it.
        bodies += [await body_of(pool, server.url()), await body_of(pool, server.url())]
        return bodies

    assert asyncio.run(close_mid_answer()) == [b"{}"] * 3
    assert server.connections == 3
