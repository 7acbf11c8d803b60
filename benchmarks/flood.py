"""A connection flood: thousands of clients that send half a request and then wait.

The flood client (asyncio, in a thread of its own) opens every connection at once and
sends `GET /metrics` without the blank line that ends the headers; meanwhile the main
thread scrapes on a new connection each time and reads the exporter's RSS, threads and
open files from /proc. Every wait is bounded, so a server that never accepts or never
closes makes targets FAIL instead of hanging the run. 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import resource
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from harness import HOST, ExporterProcess, percentile

#: Headers left unfinished: no blank line, so the server waits for the rest.
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
SCRAPE_P99_TARGET = 0.100
RSS_TARGET = 100 * 1024 * 1024
#: Seconds between two scrapes on new connections during the flood.
SCRAPE_INTERVAL = 0.05
#: Seconds a scrape during the flood may take before it counts as failed.
SCRAPE_TIMEOUT = 2.0
#: Seconds between two readings of the exporter's sockets (listing 5,000 fds costs).
SOCKET_READING_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class FloodPlan:
    connections: int
    #: Scrapes on new connections taken while the flood holds, at least.
    scrapes: int
    #: Seconds every connection has to be accepted, from the flood's start.
    accept_within: float
    #: Seconds after the last connect returned by which the server must have closed them.
    closed_after: float


FLOOD_FULL = FloodPlan(5_000, 50, 30.0, 12.0)
FLOOD_QUICK = FloodPlan(200, 10, 5.0, 1.0)


@dataclass(slots=True)
class FloodClientReport:
    """What the flood client saw; written by its thread, read once it has ended."""

    connected: int = 0
    #: Seconds from the flood's start until the last connect returned (or gave up).
    connect_seconds: float = 0.0
    #: The client-side port of each connection, to find it among the exporter's sockets.
    ports: list[int] = field(default_factory=list)
    closed_by_server: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    soft_limit: int = 0
    finished: bool = False


@dataclass(frozen=True, slots=True)
class FloodResult:
    plan: FloodPlan
    client: FloodClientReport
    #: Flood connections the exporter was seen holding a socket of.
    accepted: int
    #: Seconds from the flood's start until it held every one; None when it never did.
    all_accepted_seconds: float | None
    scrape_latencies: list[float]
    scrape_failures: int
    peak_rss: int
    peak_threads: int
    peak_open_files: int
    serving_after: bool


class OpenFilesLimit:
    """The soft RLIMIT_NOFILE raised to the hard limit in this process, restored on exit.

    Raised only after the exporter started, so the exporter keeps the limit it was given.
    """

    def __enter__(self) -> int:
        self._soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard

    def __exit__(self, *exc_info: object) -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (self._soft, hard))


async def _flood(
    plan: FloodPlan, port: int, report: FloodClientReport, connected: threading.Event
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    accept_deadline = started + plan.accept_within
    settled = 0
    all_settled = asyncio.Event()
    closed: list[bool] = [False] * plan.connections

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == plan.connections:
            all_settled.set()

    async def hold(index: int) -> None:
        try:
            async with asyncio.timeout_at(accept_deadline):
                reader, writer = await asyncio.open_connection(HOST, port)
        except (OSError, TimeoutError) as error:
            report.connect_errors[type(error).__name__] += 1
            settle()
            return
        report.connected += 1
        report.ports.append(writer.get_extra_info("sockname")[1])
        settle()
        try:
            writer.write(HALF_REQUEST)
            # Whatever the server answers (a 408, say), the connection counts once it ends.
            while await reader.read(4096):
                pass
            closed[index] = True
        except OSError:
            closed[index] = True
        finally:
            writer.transport.abort()

    holders = [asyncio.create_task(hold(index)) for index in range(plan.connections)]
    try:
        # Every connect is bounded by accept_deadline; the extra second is for the stragglers.
        with suppress(TimeoutError):
            await asyncio.wait_for(all_settled.wait(), plan.accept_within + 1.0)
        report.connect_seconds = loop.time() - started
        connected.set()
        await asyncio.sleep(plan.closed_after)
        report.closed_by_server = sum(closed)
    finally:
        connected.set()
        for holder in holders:
            holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)


def _run_flood_client(
    plan: FloodPlan, port: int, report: FloodClientReport, connected: threading.Event
) -> None:
    asyncio.run(_flood(plan, port, report, connected))
    report.finished = True


def scrape_on_new_connection(port: int, path: str, headers: Mapping[str, str]) -> float | None:
    """Seconds from connect to the last byte of a 200 with `jobstats_up 1`; None otherwise."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=SCRAPE_TIMEOUT)
    try:
        connection.request("GET", path, headers=dict(headers))
        with connection.getresponse() as response:
            body = response.read()
            ok = response.status == 200 and b"\njobstats_up 1" in body
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return time.perf_counter() - started if ok else None


def _server_side_peer_ports(pid: int, port: int) -> set[int]:
    """Client ports of the TCP connections to `port` that process `pid` holds a socket of.

    A connection counts as accepted only once the server holds it: a client's connect()
    returns as soon as the kernel has queued it (or, with a full queue, even before).
    """
    inodes = set()
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        with suppress(OSError):
            target = os.readlink(f"{folder}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    local = f":{port:04X}"
    ports = set()
    # Fields: sl, local address, remote address, state, queues, timer, retransmits, uid,
    # timeout, inode.
    for line in Path(f"/proc/{pid}/net/tcp").read_text("ascii").splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[9] in inodes:
            ports.add(int(fields[2].rpartition(":")[2], 16))
    return ports


class _ServerReadings:
    """The exporter's peaks (RSS, threads, open files) and which flood connections it
    holds, read from /proc while it lives.
    """

    def __init__(self, exporter: ExporterProcess, report: FloodClientReport) -> None:
        self._exporter = exporter
        self._report = report
        self._started = time.monotonic()
        self.peak_rss = 0
        self.peak_threads = 0
        self.peak_open_files = 0
        self.accepted_ports: set[int] = set()
        #: Seconds from the flood's start until the exporter held every flood connection.
        self.all_accepted_seconds: float | None = None
        self._last_socket_reading = 0.0

    def accepted(self) -> int:
        return len(self.accepted_ports.intersection(self._report.ports[:]))

    def read(self, planned: int) -> None:
        pid = self._exporter.pid
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text("ascii").splitlines():
                name, _, value = line.partition(":")
                if name == "VmHWM":
                    self.peak_rss = max(self.peak_rss, int(value.split()[0]) * 1024)
                elif name == "Threads":
                    self.peak_threads = max(self.peak_threads, int(value))
            now = time.monotonic()
            if now - self._last_socket_reading < SOCKET_READING_INTERVAL:
                return
            self._last_socket_reading = now
            self.peak_open_files = max(self.peak_open_files, len(os.listdir(f"/proc/{pid}/fd")))
            self.accepted_ports |= _server_side_peer_ports(pid, self._exporter.port)
            if self.all_accepted_seconds is None and self.accepted() >= planned:
                self.all_accepted_seconds = now - self._started


def run_flood(
    exporter: ExporterProcess, plan: FloodPlan, path: str, headers: Mapping[str, str]
) -> FloodResult:
    """Flood `exporter` as `plan` says while scraping `path` on new connections."""
    report = FloodClientReport()
    connected = threading.Event()
    readings = _ServerReadings(exporter, report)
    latencies: list[float] = []
    failures = 0
    with OpenFilesLimit() as limit:
        report.soft_limit = limit
        client = threading.Thread(
            target=_run_flood_client,
            args=(plan, exporter.port, report, connected),
            name="flood-client",
            daemon=True,
        )
        client.start()
        started = time.monotonic()
        # Scrape while the flood holds: until every connect has returned and enough scrapes
        # are taken, never past the accept deadline plus the scrapes' own time.
        scraping_ends = started + plan.accept_within + plan.scrapes * SCRAPE_INTERVAL
        while time.monotonic() < scraping_ends:
            if connected.is_set() and len(latencies) + failures >= plan.scrapes:
                break
            tick = time.monotonic()
            latency = scrape_on_new_connection(exporter.port, path, headers)
            if latency is None:
                failures += 1
            else:
                latencies.append(latency)
            readings.read(plan.connections)
            time.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - tick)))
        client_ends = started + plan.accept_within + 1.0 + plan.closed_after + 10.0
        while client.is_alive() and time.monotonic() < client_ends:
            readings.read(plan.connections)
            client.join(0.05)
    serving_after = scrape_on_new_connection(exporter.port, path, headers) is not None
    return FloodResult(
        plan,
        report,
        readings.accepted(),
        readings.all_accepted_seconds,
        latencies,
        failures,
        readings.peak_rss,
        readings.peak_threads,
        readings.peak_open_files,
        serving_after,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def flood_targets(result: FloodResult) -> list[tuple[str, str, bool | None]]:
    plan, client = result.plan, result.client
    scrapes = len(result.scrape_latencies) + result.scrape_failures
    p99 = percentile(result.scrape_latencies, 0.99)
    if result.scrape_failures:
        scrape_value = f"{result.scrape_failures} of {scrapes} failed"
    else:
        scrape_value = f"{_ms(p99)} ms"
    accepted_in = result.all_accepted_seconds
    return [
        (
            f"flood: all {plan.connections:,} half-request connections accepted"
            f" within {plan.accept_within:g} s",
            f"{result.accepted:,}"
            + (f" in {accepted_in:.1f} s" if accepted_in is not None else " by the end"),
            accepted_in is not None and accepted_in <= plan.accept_within,
        ),
        (
            f"flood: meanwhile a scrape on a new connection < {_ms(SCRAPE_P99_TARGET)} ms p99"
            f" ({scrapes} scrapes)",
            scrape_value,
            result.scrape_failures == 0 and p99 < SCRAPE_P99_TARGET,
        ),
        (
            f"flood: exporter peak RSS < {RSS_TARGET / 1024 / 1024:.0f} MiB",
            f"{result.peak_rss / 1024 / 1024:.1f} MiB",
            result.peak_rss < RSS_TARGET,
        ),
        (
            f"flood: {plan.closed_after:g} s after the flood the server has closed them all",
            f"{client.closed_by_server:,} / {plan.connections:,}",
            client.closed_by_server == plan.connections,
        ),
    ]


def flood_section(result: FloodResult) -> list[str]:
    plan, client = result.plan, result.client
    errors = ", ".join(f"{name} {count:,}" for name, count in client.connect_errors.items())
    accepted_in = result.all_accepted_seconds
    return [
        "## Connection flood",
        "",
        f"A fresh exporter with one 2-queue target; {plan.connections:,} connections opened at",
        "once by one asyncio client (open-files soft limit raised to the hard limit,",
        f"{client.soft_limit:,}), each sending `GET /metrics` and one header without the",
        "blank line that ends them, then reading until the server closes. A connection",
        "counts as accepted once the exporter holds its socket (/proc/<pid>/fd and",
        f"/proc/<pid>/net/tcp, read every {SOCKET_READING_INTERVAL:g} s): connect() returns as",
        "soon as the kernel has queued it. Meanwhile, a scrape on a new connection every",
        f"{SCRAPE_INTERVAL * 1000:.0f} ms (failed after {SCRAPE_TIMEOUT:g} s, or without"
        f" `jobstats_up 1`). {plan.closed_after:g} s after the",
        "last connect returned, the client counts the connections the server has closed.",
        "",
        "| flood | value |",
        "| --- | ---: |",
        f"| connects that returned | {client.connected:,} / {plan.connections:,} |",
        f"| seconds until the last returned (or gave up) | {client.connect_seconds:.2f} |",
        f"| connect errors | {errors or 'none'} |",
        f"| connections the exporter held | {result.accepted:,} / {plan.connections:,} |",
        "| seconds until it held them all | "
        + (f"{accepted_in:.2f}" if accepted_in is not None else "never")
        + " |",
        f"| scrapes on new connections meanwhile | {len(result.scrape_latencies)}"
        f" answered, {result.scrape_failures} failed |",
        f"| their p50 / p99 / max ms | {_ms(percentile(result.scrape_latencies, 0.5))}"
        f" / {_ms(percentile(result.scrape_latencies, 0.99))}"
        f" / {_ms(max(result.scrape_latencies, default=float('nan')))} |",
        f"| exporter peak RSS (VmHWM) MiB | {result.peak_rss / 1024 / 1024:.1f} |",
        f"| exporter peak threads | {result.peak_threads:,} |",
        f"| exporter peak open files | {result.peak_open_files:,} |",
        f"| closed by the server {plan.closed_after:g} s after the flood"
        f" | {client.closed_by_server:,} |",
        f"| exporter answers a scrape afterwards | {'yes' if result.serving_after else 'no'} |",
        "",
        *([] if client.finished else ["The flood client did not end within its bounds.", ""]),
    ]
