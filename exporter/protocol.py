"""HTTP/1.1 connections on asyncio: httptools parses, this module keeps the deadlines.

The `Acceptor` takes connections off the listening sockets and sets them up newest
first. One `Connection` per client socket answers its requests one at a time, in
order, through the caller's `handle(Request) -> Response`. A client has
`REQUEST_TIMEOUT` seconds to send a complete request, an idle keep-alive
connection is closed after `IDLE_TIMEOUT`, and past `max_connections` a new
connection is closed at once. It knows nothing of metrics, and parses nothing
by hand.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT",
    "Acceptor",
    "Connection",
    "ConnectionLimits",
    "Connections",
    "Request",
    "Response",
]

#: Seconds a client has, from connecting or from the first byte after an answer, to send
#: a complete request (headers and body).
REQUEST_TIMEOUT = 10.0
#: Seconds an idle keep-alive connection is kept: longer than any scrape interval in use
#: and than Prometheus' own 5 minutes, so the scraper, not the server, closes it.
IDLE_TIMEOUT = 330.0
#: Connections served at once; past it, new ones are closed as soon as accepted.
MAX_CONNECTIONS = 10_000
#: Bytes of request line and headers taken at most; more is answered 431.
MAX_HEADER_BYTES = 64 * 1024
#: Bytes of request body taken at most (no endpoint reads one); more is answered 413.
MAX_BODY_BYTES = 64 * 1024
#: Requests taken ahead of their answers on one connection before reading pauses.
MAX_PIPELINED = 8
#: Seconds a client may leave an answer unread (the send buffer full, no progress)
#: before the connection is dropped: an answer waiting for it is held in memory.
WRITE_STALL_TIMEOUT = 60.0
#: Bytes read from a socket at once.
RECEIVE_BUFFER_BYTES = 64 * 1024
#: Seconds between two passes over the connections for deadlines, at most.
SWEEP_INTERVAL = 0.5
#: Seconds between two log lines about refused connections.
_REFUSED_LOG_INTERVAL = 60.0
#: Connections taken off a listening socket per turn of the loop, at most: accept() only.
ACCEPT_BATCH = 256
#: Accepted connections set up per turn of the loop, newest first.
SETUP_BATCH = 16
#: Seconds accepting pauses when the process is out of file descriptors (as asyncio does).
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

log = logging.getLogger("jobstats_exporter")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    request_timeout: float = REQUEST_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    write_stall_timeout: float = WRITE_STALL_TIMEOUT


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    #: The request target as sent: path and query.
    target: str
    #: Header names in lower case; a repeated header keeps its last value.
    headers: Mapping[str, str]


@dataclass(slots=True)
class Response:
    status: int
    body: bytes | list[bytes | bytearray]
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def chunks(self) -> Sequence[bytes | bytearray]:
        return [self.body] if isinstance(self.body, bytes) else self.body


Handler = Callable[[Request], Awaitable[Response]]


class Connections:
    """The open connections of one server: counted against the cap, closed on shutdown."""

    def __init__(self, handle: Handler, server_name: str, limits: ConnectionLimits) -> None:
        self.handle = handle
        self.server_name = server_name
        self.limits = limits
        self.open: set[Connection] = set()
        self.refused = 0
        self._refused_logged_at = -_REFUSED_LOG_INTERVAL
        self._date: tuple[int, str] = (0, "")
        self._sweeper: asyncio.Task[None] | None = None
        #: What every connection reads into: bytes are parsed as soon as they arrive, on
        #: this server's one loop, so one buffer serves all. (A plain Protocol would be
        #: given a new bytes per read, each allocated at 256 KiB and cut down.)
        self.receive_buffer = memoryview(bytearray(RECEIVE_BUFFER_BYTES))

    def http_date(self) -> str:
        """The Date header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def protocol(self) -> Connection:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return Connection(self)

    async def _sweep(self) -> None:
        """Close the connections past their deadline, a few times per shortest timeout.

        One pass over the open connections instead of a timer each: a deadline is then a
        number set per request, with no timer to create and cancel.
        """
        limits = self.limits
        interval = min(SWEEP_INTERVAL, limits.request_timeout / 4, limits.idle_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for connection in [c for c in self.open if c.deadline <= now]:
                connection.expire()

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_INTERVAL:
            self._refused_logged_at = now
            log.warning(
                "connection limit reached: new connections are closed",
                extra={"max_connections": self.limits.max_connections, "count": self.refused},
            )

    async def close(self, grace: float) -> None:
        """Close idle connections now; give those answering a request `grace` seconds."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.open):
            connection.close_when_idle()
        deadline = time.monotonic() + grace
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.open):
            connection.abort()


class Acceptor:
    """Takes connections off the listening sockets as fast as the kernel queues them, and
    sets them up newest first.

    asyncio's own accepting sets each connection up (a task, a transport) before it takes
    the next: under a flood of 5,000, a scrape's connection waited behind every one the
    kernel had queued before it, 100 ms and more. Here accepting is accept() alone, so the
    kernel's queue empties at once into a list, and SETUP_BATCH connections a turn are set
    up from its end: the newest (a scraper's, say) first, the flood that has been waiting
    after. Those that waited past the request deadline are closed, never set up, so a
    flood that never ends cannot keep the oldest for ever. The cap on connections counts
    those waiting too.
    """

    def __init__(
        self,
        connections: Connections,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self._connections = connections
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._listeners: list[socket.socket] = []
        #: Accepted, not yet set up: (socket, loop time accepted), oldest first.
        self._waiting: deque[tuple[socket.socket, float]] = deque()
        self._setting_up = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self, listening: Sequence[socket.socket]) -> None:
        """Accept on each of `listening` (bound and listening sockets this object owns)."""
        self._loop = asyncio.get_running_loop()
        for listener in listening:
            listener.setblocking(False)
            self._listeners.append(listener)
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def close(self) -> None:
        """Stop accepting; close the listening sockets and the connections not set up."""
        for listener in self._listeners:
            if self._loop is not None and listener.fileno() >= 0:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
        for waiting, _ in self._waiting:
            waiting.close()
        self._waiting.clear()

    def _accept(self, listener: socket.socket) -> None:
        assert self._loop is not None
        connections = self._connections
        cap = connections.limits.max_connections
        now = self._loop.time()
        for _ in range(ACCEPT_BATCH):
            try:
                accepted, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client left before it was taken
            except OSError as error:
                if error.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause(listener, error)
                break
            # Those being set up count nowhere here: connection_made checks the cap again.
            if len(connections.open) + len(self._waiting) >= cap:
                accepted.close()
                connections.refuse()
                continue
            accepted.setblocking(False)
            self._waiting.append((accepted, now))
        if self._waiting and not self._setting_up:
            self._setting_up = True
            self._loop.call_soon(self._set_up)

    def _pause(self, listener: socket.socket, error: OSError) -> None:
        """Out of file descriptors: the connections stay in the kernel's queue meanwhile."""
        assert self._loop is not None
        log.error(
            "cannot accept connections: retrying in a second",
            extra={"err": error.strerror or str(error)},
        )
        self._loop.remove_reader(listener.fileno())
        self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        if self._loop is not None and listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _set_up(self) -> None:
        assert self._loop is not None
        waiting = self._waiting
        # The oldest first: a flood that never ends would otherwise keep them for ever.
        stale_before = self._loop.time() - self._connections.limits.request_timeout
        while waiting and waiting[0][1] < stale_before:
            waiting.popleft()[0].close()  # waited past the request deadline: not served
        for _ in range(min(SETUP_BATCH, len(waiting))):
            accepted, _ = waiting.pop()
            task = self._loop.create_task(self._connect(accepted))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if waiting:
            self._loop.call_soon(self._set_up)
        else:
            self._setting_up = False

    async def _connect(self, accepted: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(
                self._connections.protocol,
                accepted,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
            )
        except (OSError, TimeoutError):  # a TLS handshake that failed or never came
            accepted.close()


class Connection(asyncio.BufferedProtocol):
    """One client's connection: parse, answer in order, keep the deadlines."""

    # Slots: a flood holds thousands of these, and each object less per connection is
    # one less for every garbage collection pass to visit.
    __slots__ = (
        "_body_bytes",
        "_closing",
        "_connections",
        "_drained",
        "_head_bytes",
        "_headers",
        "_idle",
        "_in_body",
        "_in_message",
        "_last_request_taken",
        "_loop",
        "_parser",
        "_received",
        "_requests",
        "_stalled",
        "_task",
        "_too_large",
        "_transport",
        "_url",
        "deadline",
    )

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        #: Loop time past which the connection is closed, unless it is answering.
        self.deadline = math.inf
        #: Drops the connection when a paused write makes no progress in time.
        self._stalled: asyncio.TimerHandle | None = None
        self._requests: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        #: Set while asyncio has paused writing: resolved once the client has read enough.
        self._drained: asyncio.Future[None] | None = None
        self._closing = False
        #: Close once the requests taken so far are answered.
        self._last_request_taken = False
        #: True while the timer is the idle one, between an answer and the next byte.
        self._idle = False
        #: The status that refuses a request too large to take; 0 while none is.
        self._too_large = 0
        # The request being received.
        self._in_message = False
        #: Headers complete, the body (if any) is being received.
        self._in_body = False
        #: Bytes received since the last request was complete, while in its headers.
        self._head_bytes = 0
        self._received = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        #: Bytes of the body: counted against the cap, not kept (no endpoint reads one).
        self._body_bytes = 0

    # --- asyncio.BufferedProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        connections = self._connections
        if len(connections.open) >= connections.limits.max_connections:
            connections.refuse()
            transport.abort()
            return
        connections.open.add(self)
        # (asyncio sets TCP_NODELAY on every TCP transport: Nagle holds no answer.)
        self._arm(connections.limits.request_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open.discard(self)
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
        self._closing = True
        self._wake_writer()
        if self._task is not None:
            # A scrape whose client left: its shared upstream request goes on for the others.
            self._task.cancel()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._connections.receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._connections.receive_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        if self._idle:
            # The first byte after an answer: the request deadline starts now.
            self._arm(self._connections.limits.request_timeout)
        if not self._in_body:
            # Counted before parsing: a header that never ends would otherwise grow in the
            # parser's buffer, unchecked, until it did.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol upgrade is offered: the request is answered, then the connection ends.
            self._last_request_taken = True
        except httptools.HttpParserError:
            if self._requests or self._task is not None or self._last_request_taken:
                # What follows good requests (bytes after a `Connection: close`, or
                # garbage) ends the connection once they are answered, not before.
                self._last_request_taken = True
                if self._transport is not None:
                    self._transport.pause_reading()
                return
            self._refuse(HTTPStatus.BAD_REQUEST)
            return
        if self._too_large:
            self._refuse(HTTPStatus(self._too_large))
            return
        if len(self._requests) >= MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self._loop.create_future()
        self._stalled = self._loop.call_later(
            self._connections.limits.write_stall_timeout, self.abort
        )

    def resume_writing(self) -> None:
        self._wake_writer()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    # --- httptools callbacks -----------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_message_begin(self) -> None:
        self._in_message = True
        self._received = 0
        self._url = b""
        self._headers = {}
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._received += len(url)
        if self._received > MAX_HEADER_BYTES:
            self._too_large = self._too_large or HTTPStatus.REQUEST_URI_TOO_LONG
            return
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._received += len(name) + len(value) + 4
        if self._received > MAX_HEADER_BYTES:
            self._too_large = self._too_large or HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            self._too_large = self._too_large or HTTPStatus.REQUEST_ENTITY_TOO_LARGE

    def on_message_complete(self) -> None:
        self._in_message = False
        self._in_body = False
        self._head_bytes = 0
        if self._too_large or self._last_request_taken:
            return
        self._requests.append(
            Request(
                self._parser.get_method().decode("ascii", "replace"),
                self._url.decode("latin-1"),
                self._headers,
            )
        )
        # The client asked to close after this answer (or spoke HTTP/1.0 without keep-alive).
        self._last_request_taken = not self._parser.should_keep_alive()
        self._disarm()
        if self._task is None:
            self._task = self._loop.create_task(self._answer_all())

    # --- answering ---------------------------------------------------------------------

    async def _answer_all(self) -> None:
        try:
            while self._requests and not self._closing:
                request = self._requests.popleft()
                if self._transport is not None and len(self._requests) < MAX_PIPELINED:
                    self._transport.resume_reading()
                response = await self._connections.handle(request)
                await self._writable()
                if self._closing:
                    return
                keep_alive = not (self._last_request_taken and not self._requests)
                await self._send(response, keep_alive, head_only=request.method == "HEAD")
                if self._closing:
                    return
                if not keep_alive:
                    self._close()
                    return
        finally:
            self._task = None
        if not self._closing:
            limits = self._connections.limits
            if self._in_message:
                self._arm(limits.request_timeout)
            else:
                self._arm(limits.idle_timeout)
                self._idle = True

    def _head(
        self, response: Response, chunks: Sequence[bytes | bytearray], keep_alive: bool
    ) -> bytes:
        status = HTTPStatus(response.status)
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Server: {self._connections.server_name}",
            f"Date: {self._connections.http_date()}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {sum(map(len, chunks))}",
        ]
        lines.extend(f"{name}: {value}" for name, value in response.headers.items())
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _write(self, response: Response, keep_alive: bool, head_only: bool = False) -> None:
        """A small answer, headers and body in one send: nothing for Nagle to hold."""
        assert self._transport is not None
        chunks = response.chunks
        head = self._head(response, chunks, keep_alive)
        self._transport.write(head if head_only else b"".join([head, *chunks]))

    async def _send(self, response: Response, keep_alive: bool, head_only: bool) -> None:
        chunks = response.chunks
        if head_only or sum(map(len, chunks)) <= _ONE_WRITE_BYTES:
            # An answer to HEAD is the headers GET would get, Content-Length included.
            self._write(response, keep_alive, head_only)
            return
        # A large answer goes out a slice at a time, as fast as the client takes it: what
        # waits in this process is one slice, never a copy of the whole answer.
        assert self._transport is not None
        self._transport.write(self._head(response, chunks, keep_alive))
        for chunk in chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), _ONE_WRITE_BYTES):
                await self._writable()
                if self._closing or self._transport.is_closing():
                    return  # the client left mid-answer: nothing more to write
                self._transport.write(view[start : start + _ONE_WRITE_BYTES])

    async def _writable(self) -> None:
        """Return once asyncio takes more to write (at once, unless it paused writing)."""
        if self._drained is not None:
            await self._drained

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _refuse(self, status: HTTPStatus) -> None:
        """Answer a request that cannot be parsed or is too large, then close."""
        self._requests.clear()
        if self._task is None and self._transport is not None:
            self._write(Response(status.value, f"{status.phrase}\n".encode(), _TEXT), False)
        self._close()

    # --- closing -----------------------------------------------------------------------

    def close_when_idle(self) -> None:
        if self._task is None:
            self._close()
        else:
            self._last_request_taken = True
            self._requests.clear()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self._closing = True
        self._disarm()
        if self._transport is not None:
            self._transport.close()

    def _arm(self, seconds: float) -> None:
        self.deadline = self._loop.time() + seconds
        self._idle = False

    def _disarm(self) -> None:
        self.deadline = math.inf

    def expire(self) -> None:
        """Its deadline has passed: close, unless an answer is being made."""
        self.deadline = math.inf
        if self._task is None:
            self._close()


_TEXT = "text/plain; charset=utf-8"
#: Answers up to this size are joined and written in one call.
_ONE_WRITE_BYTES = 64 * 1024
