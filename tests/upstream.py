"""A controllable fake of the job stats API, and the exporter run as a real process.

`FakeStatsApi` is a standard-library HTTP server on 127.0.0.1 whose answer each test
sets: status, body, headers and a misbehaviour (slow, trickle, truncated, undeclared
length). It counts the requests it receives and keeps their headers; optionally it
serves over TLS, demands one Authorization value, or holds answers at a gate. It
must never listen beyond 127.0.0.1, and processes are only ever stopped by the PID
they were started with.
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, cast

__all__ = [
    "HOST",
    "STATS_PATH",
    "Answer",
    "Behaviour",
    "ExporterProcess",
    "FakeStatsApi",
    "clean_environment",
    "exporter_command",
    "free_port",
    "http_get",
    "running_exporter",
    "start_exporter",
    "wait_until",
]

HOST = "127.0.0.1"
STATS_PATH = "/api/jobs/stats"
#: Pause between two looks at something awaited; the deadline, not this, bounds a wait.
POLL_INTERVAL = 0.02

Behaviour = Literal["normal", "slow", "trickle", "truncated", "undeclared"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the fake API answers, and how.

    - `normal`: status, headers and body in one go, with Content-Length.
    - `slow`: wait `delay` seconds before sending anything.
    - `trickle`: headers with the body's full Content-Length, then one byte every `interval`.
    - `truncated`: a Content-Length `missing` bytes larger than the body, then close.
    - `undeclared`: no Content-Length; the body ends when the connection closes.
    """

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    behaviour: Behaviour = "normal"
    delay: float = 3.0
    interval: float = 0.2
    missing: int = 1000


@dataclass(slots=True)
class _Record:
    paths: list[str] = field(default_factory=list)
    handler_errors: list[str] = field(default_factory=list)
    headers: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    tls_failures: int = 0
    held: int = 0


#: What the fake API answers a request without the Authorization it demands.
UNAUTHORIZED = Answer(
    status=401,
    body=b"Unauthorized\n",
    headers=(("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="stats"')),
)


class FakeStatsApi:
    """The stats API played by a ThreadingHTTPServer on 127.0.0.1, port chosen by the OS.

    Use as a context manager, or call `close()`: it stops answering, drops open
    connections and joins every handler thread.

    - `tls`: a server-side SSLContext; the API is then served over HTTPS (`url` says so).
      A client that gives up the handshake is counted in `tls_failures`, not `requests`.
    - `authorization`: when set, a request whose Authorization header is not exactly
      this value is answered 401 (it is still counted, and its headers kept).
    """

    def __init__(
        self,
        answer: Answer | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        authorization: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._answer = answer or Answer()
        self._record = _Record()
        self._connections: set[socket.socket] = set()
        self._tls = tls
        self._authorization = authorization
        # Open unless a test calls hold(); guarded by _lock.
        self._gate = threading.Condition(self._lock)
        self._gate_open = True
        self.stopping = threading.Event()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-api"
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{HOST}:{self.port}{STATS_PATH}"

    def answer(self, answer: Answer) -> None:
        """Answer every request from now on with `answer`."""
        with self._lock:
            self._answer = answer

    @property
    def requests(self) -> int:
        """Requests received so far, whatever became of them."""
        with self._lock:
            return len(self._record.paths)

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return list(self._record.paths)

    @property
    def request_headers(self) -> list[tuple[tuple[str, str], ...]]:
        """The headers of each request received so far, in order, as (name, value) pairs."""
        with self._lock:
            return list(self._record.headers)

    def header_values(self, name: str) -> list[str | None]:
        """The value of header `name` (any case) in each request so far; None where absent."""
        wanted = name.lower()
        return [
            next((value for key, value in headers if key.lower() == wanted), None)
            for headers in self.request_headers
        ]

    @property
    def tls_failures(self) -> int:
        """TLS handshakes that did not complete (the client refused the certificate, say)."""
        with self._lock:
            return self._record.tls_failures

    def expect_authorization(self, authorization: str | None) -> None:
        """From now on answer 401 unless Authorization is exactly this (None: accept any)."""
        with self._lock:
            self._authorization = authorization

    def hold(self) -> None:
        """Close the gate: requests from now on are counted, then wait for `release()`."""
        with self._lock:
            self._gate_open = False

    def release(self) -> None:
        """Open the gate: every waiting request gets its answer, and later ones at once."""
        with self._gate:
            self._gate_open = True
            self._gate.notify_all()

    @property
    def held(self) -> int:
        """Requests waiting at the closed gate now."""
        with self._lock:
            return self._record.held

    @property
    def handler_errors(self) -> list[str]:
        """Unexpected exceptions in handlers (a client hanging up is expected, not listed)."""
        with self._lock:
            return list(self._record.handler_errors)

    def close(self) -> None:
        self.stopping.set()
        # Requests held at the gate go free, and see `stopping`.
        self.release()
        self._server.shutdown()
        self._thread.join()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            # Wakes handlers blocked reading a keep-alive connection the exporter holds open.
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()

    def __enter__(self) -> FakeStatsApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _received_request(self, path: str, headers: Sequence[tuple[str, str]]) -> Answer | None:
        """Count and record one request, wait at the gate if held; what to answer it.

        None when the request was held at the gate until `close()`: it gets no answer.
        """
        with self._gate:
            self._record.paths.append(path)
            self._record.headers.append(tuple(headers))
            answer = self._answer
            if self._authorization is not None:
                given = [value for key, value in headers if key.lower() == "authorization"]
                if given != [self._authorization]:
                    answer = UNAUTHORIZED
            if not self._gate_open:
                self._record.held += 1
                try:
                    self._gate.wait_for(lambda: self._gate_open)
                finally:
                    self._record.held -= 1
                if self.stopping.is_set():
                    return None
            return answer

    def _tls_failed(self) -> None:
        with self._lock:
            self._record.tls_failures += 1

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _failed(self, error: BaseException | None) -> None:
        with self._lock:
            self._record.handler_errors.append(repr(error))


class LoopbackServer(ThreadingHTTPServer):
    """A threading HTTP server on 127.0.0.1, port chosen by the system, for test fakes."""

    # Handler threads are joined on close, so no socket outlives the fixture.
    daemon_threads = False
    block_on_close = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((HOST, 0), handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's name; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]


class _Server(LoopbackServer):
    def __init__(self, api: FakeStatsApi) -> None:
        self.api = api
        super().__init__(_Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        tls = self.api._tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        # The handshake runs in the connection's own thread, so a stalled client blocks nobody.
        request.settimeout(10)
        try:
            wrapped = tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.api._tls_failed()
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            # wrap_socket detached the plain socket, which socketserver closes: close this one.
            with suppress(OSError):
                wrapped.shutdown(socket.SHUT_WR)
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | TimeoutError | ssl.SSLError):
            self.api._failed(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection is dropped after this many seconds.
    timeout = 10

    @property
    def api(self) -> FakeStatsApi:
        return cast(_Server, self.server).api

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.api._opened(self.connection)

    def finish(self) -> None:
        self.api._closed(self.connection)
        super().finish()

    def do_GET(self) -> None:
        answer = self.api._received_request(self.path, list(self.headers.items()))
        if answer is None:
            self.close_connection = True
            return
        try:
            self._send(answer)
        except (ConnectionError, TimeoutError):
            # The exporter gave up on this answer: expected for slow and trickle.
            self.close_connection = True

    def _send(self, answer: Answer) -> None:
        if answer.behaviour == "slow" and self.api.stopping.wait(answer.delay):
            self.close_connection = True
            return
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.behaviour == "truncated":
            self.send_header("Content-Length", str(len(answer.body) + answer.missing))
        elif answer.behaviour != "undeclared":
            self.send_header("Content-Length", str(len(answer.body)))
        if answer.behaviour in ("truncated", "undeclared"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if answer.behaviour != "trickle":
            self.wfile.write(answer.body)
            return
        for index in range(len(answer.body)):
            if self.api.stopping.wait(answer.interval):
                self.close_connection = True
                return
            self.wfile.write(answer.body[index : index + 1])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # Requests are counted, not logged: stderr belongs to pytest's report.
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return cast(int, probe.getsockname()[1])


def http_get(
    port: int,
    path: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 15.0,
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One GET to 127.0.0.1:`port`; the status and the whole body. The connection is closed.

    With `tls` (a client SSLContext) the GET goes over HTTPS.
    """
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection(HOST, port, timeout=timeout, context=tls)
        if tls is not None
        else http.client.HTTPConnection(HOST, port, timeout=timeout)
    )
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        with connection.getresponse() as response:
            return response.status, response.read()
    finally:
        connection.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once `condition()` is true; fail naming `what` when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)


def clean_environment() -> dict[str, str]:
    """This process's environment without JOBSTATS_* settings, which would change the exporter."""
    return {name: value for name, value in os.environ.items() if not name.startswith("JOBSTATS_")}


def exporter_command(*args: str) -> list[str]:
    """The command line of the exporter, as `python -m exporter` with this interpreter."""
    return [sys.executable, "-m", "exporter", *args]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM `process` by its PID, wait up to `timeout` s (then SIGKILL); its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


class ExporterProcess:
    """One exporter process started by `start_exporter`; its output goes to files."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        stderr_path: Path,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self.stderr_path = stderr_path
        #: The client SSLContext to reach an exporter serving HTTPS; None for plain HTTP.
        self.tls = tls

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stdout(self) -> str:
        """What the process wrote to stdout (its file sits next to the stderr one)."""
        return self.stderr_path.with_suffix(".stdout").read_text(encoding="utf-8", errors="replace")

    def stderr_mark(self) -> int:
        """Where stderr ends now: `stderr_since(mark)` is what was written after."""
        return self.stderr_path.stat().st_size

    def stderr_since(self, mark: int) -> str:
        with self.stderr_path.open("rb") as stream:
            stream.seek(mark)
            return stream.read().decode("utf-8", errors="replace")

    def get(
        self, path: str, headers: Mapping[str, str] | None = None, timeout: float = 15.0
    ) -> tuple[int, bytes]:
        return http_get(self.port, path, headers, timeout, tls=self.tls)

    def serves(self) -> bool:
        """True once /-/ready answers 200; fails at once if the process has exited."""
        if self.process.poll() is not None:
            raise AssertionError(
                f"exporter exited with {self.process.returncode} before serving:\n{self.stderr()}"
            )
        try:
            status, _ = http_get(self.port, "/-/ready", timeout=1.0, tls=self.tls)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, wait up to `timeout` s (then SIGKILL); the exit status."""
        return stop_process(self.process, timeout)


def start_exporter(
    args: Sequence[str],
    log_dir: Path,
    *,
    command: Sequence[str] = (),
    ready_timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> ExporterProcess:
    """Start `python -m exporter [command] --web.listen-address 127.0.0.1:<free> args`.

    Returns once /-/ready answers; stderr and stdout go to files in `log_dir`. `env`
    adds variables to the clean environment; `tls` is the client SSLContext to reach
    an exporter that serves HTTPS.
    """
    port = free_port()
    argv = exporter_command(*command, "--web.listen-address", f"{HOST}:{port}", *args)
    stderr_path = log_dir / f"exporter-{port}.stderr"
    environment = clean_environment() | dict(env or {})
    with stderr_path.open("wb") as stderr, (log_dir / f"exporter-{port}.stdout").open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=stderr, env=environment)
    exporter = ExporterProcess(process, port, stderr_path, tls=tls)
    try:
        wait_until(exporter.serves, ready_timeout, f"the exporter on port {port} to be ready")
    except BaseException:
        exporter.stop()
        raise
    return exporter


@contextmanager
def running_exporter(
    args: Sequence[str],
    log_dir: Path,
    *,
    command: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Iterator[ExporterProcess]:
    """`start_exporter` as a context manager that stops the process by its PID on exit."""
    exporter = start_exporter(args, log_dir, command=command, env=env, tls=tls)
    try:
        yield exporter
    finally:
        exporter.stop()
