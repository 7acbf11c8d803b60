"""What the benchmark and the soak run share: the exporter as a process, /proc readings,
keep-alive clients and a fast local upstream server.

Everything listens on 127.0.0.1 only, and the exporter is only ever stopped by the PID
it was started with. Nothing here imports from tests/: the samples are read as files.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

__all__ = [
    "HOST",
    "REPOSITORY",
    "SAMPLES",
    "ExporterProcess",
    "HarnessError",
    "KeepAliveClient",
    "LocalHTTPServer",
    "QuietHandler",
    "cpu_seconds",
    "free_port",
    "http_response",
    "memory_bytes",
    "percentile",
    "sample",
]

HOST = "127.0.0.1"
REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLES = REPOSITORY / "tests" / "fixtures" / "samples"
#: Seconds the exporter has to answer /-/ready after it starts.
READY_TIMEOUT = 30.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class HarnessError(RuntimeError):
    """Something broke (the exporter died, a scrape was not 200): the figures mean nothing."""


def sample(name: str) -> dict[str, Any]:
    """One captured upstream answer of tests/fixtures/samples, decoded."""
    return cast(dict[str, Any], json.loads((SAMPLES / f"{name}.json").read_text("utf-8")))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of asking."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return cast(int, probe.getsockname()[1])


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (0.5 is the median); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def http_response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    """A whole HTTP/1.1 response, status line to body, to be written in one send."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class LocalHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1, serving from a thread of its own until `close()`.

    Every GET is answered by `respond(handler)`; handlers keep connections alive
    (HTTP/1.1) with TCP_NODELAY and log nothing. Port 0 lets the OS choose.
    """

    daemon_threads = True

    def __init__(self, port: int, respond: Callable[[QuietHandler], None]) -> None:
        self.respond = respond
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        super().__init__((HOST, port), QuietHandler)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        """Stop serving, close the listening socket and drop every open connection."""
        self.shutdown()
        self._thread.join()
        self.server_close()
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            # Wakes handlers blocked reading an idle keep-alive connection.
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's name; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up mid-answer on purpose here (timeouts, body caps): not news.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class QuietHandler(BaseHTTPRequestHandler):
    """One connection to a LocalHTTPServer."""

    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection is dropped after this many seconds.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        cast(LocalHTTPServer, self.server).respond(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class KeepAliveClient:
    """GETs over one keep-alive connection, as Prometheus scrapes; timed with perf_counter."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self._connection = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes, float]:
        """The status, the whole body and the seconds from sending to the last byte."""
        started = time.perf_counter()
        self._connection.request("GET", path, headers=dict(headers or {}))
        with self._connection.getresponse() as response:
            body = response.read()
            status = response.status
        return status, body, time.perf_counter() - started

    def get_ok(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[bytes, float]:
        """As `get`, but anything other than 200 is a HarnessError."""
        status, body, elapsed = self.get(path, headers)
        if status != 200:
            raise HarnessError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return body, elapsed

    def close(self) -> None:
        self._connection.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text("ascii")
    # Fields after the command name, which may hold spaces, start at field 3 (state).
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_bytes(pid: int, field: str) -> int:
    """A Vm* line of /proc/<pid>/status (VmRSS, VmHWM) of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text("ascii").splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise HarnessError(f"no {field} in /proc/{pid}/status")


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM `process` by its PID, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _python_running_exporter(without_modules: Sequence[str]) -> list[str]:
    """`python -m exporter`, or its equivalent with some modules made unimportable."""
    if not without_modules:
        return [sys.executable, "-m", "exporter"]
    # A None in sys.modules makes `import name` raise ImportError, as if it were absent.
    launcher = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({list(without_modules)!r}))\n"
        "runpy.run_module('exporter', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-c", launcher]


class ExporterProcess:
    """`python -m exporter --config.file <file> --web.listen-address 127.0.0.1:<port>`.

    The exporter is this checkout's (REPOSITORY leads PYTHONPATH). Its output goes to a
    temporary file, shown when it dies; `stop()` ends it by PID.
    """

    def __init__(self, config_yaml: str, without_modules: Sequence[str] = ()) -> None:
        """`without_modules` cannot be imported in the process: `("hiredis",)` makes redis-py
        fall back to its pure-Python parser, as on a machine where hiredis is not installed.
        """
        self._folder = tempfile.TemporaryDirectory(prefix="jobstats-bench-")
        folder = Path(self._folder.name)
        config_file = folder / "config.yml"
        config_file.write_text(config_yaml, encoding="utf-8")
        self.port = free_port()
        self._log = folder / "exporter.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("JOBSTATS_")}
        # This checkout's exporter/, never the one an editable install elsewhere points at.
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *_python_running_exporter(without_modules),
                    "--config.file",
                    str(config_file),
                    "--web.listen-address",
                    f"{HOST}:{self.port}",
                ],
                cwd=REPOSITORY,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
                connection.request("GET", "/-/ready")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
                connection.close()
            except OSError:
                pass
            time.sleep(0.05)
        raise HarnessError(f"the exporter was not ready within {READY_TIMEOUT:g}s")

    def output(self) -> str:
        """What the exporter wrote on stdout and stderr so far (the last 4,000 characters)."""
        return self._log.read_text("utf-8", errors="replace")[-4000:]

    def check_alive(self) -> None:
        """HarnessError, with the exporter's output, when the process has exited."""
        if self.process.poll() is not None:
            raise HarnessError(
                f"the exporter exited with status {self.process.returncode}:\n{self.output()}"
            )

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far (/proc/<pid>/stat)."""
        return cpu_seconds(self.pid)

    def memory_bytes(self, field: str) -> int:
        """A Vm* line of /proc/<pid>/status (VmRSS, VmHWM) in bytes."""
        return memory_bytes(self.pid, field)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL after `timeout` seconds; removes the temporary files."""
        stop_process(self.process, timeout)
        self._folder.cleanup()
