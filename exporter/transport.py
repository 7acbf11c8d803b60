"""An httpx transport for the stats API: HTTP/1.1 over asyncio's own streams, parsed by h11.

httpx's default transport reaches the network through httpcore and anyio, whose locks,
cancel scopes and checkpoints cost more per small request than the rest of the
exchange, and whose asyncio backend alone is 0.9 MiB of a running exporter. This one
keeps a few kept-alive connections and leaves all of HTTP to h11 (httpcore's own
HTTP/1.1 parser): it frames the request, parses the answer and says when a connection
may carry another. The errors are those httpx's own transport raises.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx

__all__ = ["KEEPALIVE_EXPIRY", "StreamsTransport"]

#: Seconds an idle kept-alive connection is trusted for reuse, as httpx's own default: a
#: server may close an older one at any moment, and a request on it would fail.
KEEPALIVE_EXPIRY = 5.0
#: Bytes read from the socket at once.
_READ_BYTES = 64 * 1024
_MAX_HEAD_BYTES = 100 * 1024
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

#: (scheme, host, port)
Origin = tuple[bytes, str, int]


class _Connection:
    """One HTTP/1.1 connection: asyncio's stream pair and h11's state of the exchange."""

    def __init__(
        self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.origin = origin
        self._reader = reader
        self._writer = writer
        # A head (status line and headers) of up to 100 KiB, as httpcore allows: h11's own
        # default, 16 KiB, would refuse a long cookie depending on how the bytes arrive.
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        #: Loop time at which the connection was last put back, idle.
        self.idle_since = 0.0

    def still_good(self, now: float) -> bool:
        """Idle for less than KEEPALIVE_EXPIRY, and not closed or reset by the server
        meanwhile (an idle connection with something to read is one of those)."""
        if now - self.idle_since > KEEPALIVE_EXPIRY:
            return False
        if (
            self._writer.transport.is_closing()
            or self._reader.at_eof()
            or self._reader.exception() is not None
        ):
            return False
        return not _readable(self._writer.get_extra_info("socket"))

    async def send(self, event: h11.Event, timeout: float | None) -> None:
        try:
            data = self.http.send(event)
        except h11.LocalProtocolError as error:
            raise httpx.LocalProtocolError(str(error)) from error
        if not data:
            return
        try:
            self._writer.write(data)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("timed out writing") from None
        except OSError as error:
            raise httpx.WriteError(str(error)) from error

    async def next_event(self, timeout: float | None) -> Any:
        """h11's next event of the answer, reading as much as that takes."""
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as error:
                raise httpx.RemoteProtocolError(str(error)) from error
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout(timeout):
                    data = await self._reader.read(_READ_BYTES)
            except TimeoutError:
                raise httpx.ReadTimeout("timed out reading") from None
            except OSError as error:
                raise httpx.ReadError(str(error)) from error
            # b"" is the end of the stream: h11 then knows whether the answer was whole.
            self.http.receive_data(data)

    def close(self) -> None:
        """At once, with no TLS goodbye to wait for: an HTTP answer is framed, so nothing
        depends on it, and a server that never answers one cannot hold the exporter."""
        self._writer.transport.abort()


def _readable(sock: socket.socket | None) -> bool:
    if sock is None or sock.fileno() < 0:
        return True
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    return bool(poll.poll(0))


class _Body(httpx.AsyncByteStream):
    """The answer's body as h11 frames it; closing it puts the connection back."""

    def __init__(
        self, pool: StreamsTransport, connection: _Connection, timeout: float | None
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._timeout = timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._connection.next_event(self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:  # h11 gives nothing else inside an answer's body
                raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} in a body")

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._connection)


class StreamsTransport(httpx.AsyncBaseTransport):
    """httpx's AsyncHTTPTransport for GETs, minus httpcore and anyio: HTTP/1.1 with a
    keep-alive pool, on the running loop."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None, max_connections: int, max_keepalive: int
    ) -> None:
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive
        self._idle: list[_Connection] = []
        self._in_use = 0
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        if self._in_use >= self._max_connections:
            # Scrapes share one request per target: this many at once is a bug, not load.
            raise httpx.PoolTimeout(f"{self._max_connections} connections in use")
        url = request.url
        # The host as httpx encodes it (IDNA 2008, as in the Host header), not as Python's
        # idna codec (2003) would encode url.host: for straße.de, another host.
        host = url.raw_host.decode("ascii")
        origin = (url.raw_scheme, host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 0))
        self._in_use += 1
        connection = None
        try:
            connection = self._idle_connection(origin) or await self._connect(
                origin, timeouts.get("connect")
            )
            answer = await self._exchange(
                connection, request, timeouts.get("write"), timeouts.get("read")
            )
        except BaseException:
            self._in_use -= 1
            if connection is not None:
                connection.close()
            raise
        return httpx.Response(
            status_code=answer.status_code,
            headers=answer.headers.raw_items(),
            stream=_Body(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason},
        )

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        for connection in reversed(self._idle):
            if connection.origin != origin:
                continue
            self._idle.remove(connection)
            if connection.still_good(now):
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme.decode()!r}")
        context = None
        if scheme == b"https":
            context = self._ssl_context or httpx.create_ssl_context()
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting") from None
        except OSError as error:  # ssl.SSLError included
            raise httpx.ConnectError(str(error)) from error
        return _Connection(origin, reader, writer)

    async def _exchange(
        self,
        connection: _Connection,
        request: httpx.Request,
        write_timeout: float | None,
        read_timeout: float | None,
    ) -> h11.Response:
        try:
            head = h11.Request(
                method=request.method, target=request.url.raw_path, headers=request.headers.raw
            )
        except h11.LocalProtocolError as error:  # a header value h11 refuses to send
            raise httpx.LocalProtocolError(str(error)) from error
        await connection.send(head, write_timeout)
        async for chunk in request.stream:  # type: ignore[union-attr]
            if chunk:
                await connection.send(h11.Data(data=chunk), write_timeout)
        await connection.send(h11.EndOfMessage(), write_timeout)
        while True:
            event = await connection.next_event(read_timeout)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError("server disconnected without sending a response")

    def release(self, connection: _Connection) -> None:
        """Put back a connection whose answer is closed: idle when h11 says it may carry
        another request, closed when not (its body not read to the end, say), or when the
        server sent more than the answer (those bytes would be read as the next one)."""
        self._in_use -= 1
        http = connection.http
        if (
            not self._closed
            and http.our_state is h11.DONE
            and http.their_state is h11.DONE
            and not http.trailing_data[0]
            and len(self._idle) < self._max_keepalive
        ):
            http.start_next_cycle()
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        """Close the idle connections, and each in use once its answer is closed. (A request
        made after still works, on a connection of its own, as with httpcore's pool.)"""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
