"""A connection flood: thousands of clients that send half a request and then wait.

The flood client (asyncio, in a process of its own) opens every connection at once and
sends `GET /metrics` without the blank line that ends the headers; meanwhile this
process scrapes on a new connection each time and reads the exporter's RSS, threads and
open files from /proc. The client is a process, not a thread, so that the scrapes time
the exporter: a thread would share the interpreter lock and the garbage collector with
5,000 connections' worth of client objects, and its pauses would count as the
exporter's. Every wait is bounded, so a server that never accepts or never closes
makes targets FAIL instead of hanging the run. 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

from harness import HOST, ExporterProcess, percentile

#: Headers left unfinished: no blank line, so the server waits for the rest.
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
SCRAPE_P99_TARGET = 0.100
RSS_TARGET = 100 * 1024 * 1024
#: Seconds the flood client's process has to start flooding.
CLIENT_START_TIMEOUT = 30.0
#: Scrapes before the flood, not counted.
WARMUP_SCRAPES = 3
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
    """What the flood client saw; sent by its process once it has ended."""

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


async def _flood(
    plan: FloodPlan, port: int, report: FloodClientReport, flooding: Event, connected: Event
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
    flooding.set()
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
    plan: FloodPlan, port: int, results: Connection, flooding: Event, connected: Event
) -> None:
    """The flood client's process: its open-files soft limit raised to the hard one."""
    report = FloodClientReport()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report.soft_limit = hard
    asyncio.run(_flood(plan, port, report, flooding, connected))
    report.finished = True
    results.send(report)


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
    """The exporter's peaks (RSS, threads, open files) and when it first held each client
    port's connection, read from /proc while it lives.
    """

    def __init__(self, exporter: ExporterProcess) -> None:
        self._exporter = exporter
        self._started = time.monotonic()
        self.peak_rss = 0
        self.peak_threads = 0
        self.peak_open_files = 0
        #: Seconds from the flood's start until the exporter was first seen holding a
        #: connection from each client port (the scrapes' ports too).
        self.first_held: dict[int, float] = {}
        self._last_socket_reading = 0.0

    def read(self) -> None:
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
            for port in _server_side_peer_ports(pid, self._exporter.port):
                self.first_held.setdefault(port, now - self._started)

    def accepted(self, ports: Sequence[int]) -> tuple[int, float | None]:
        """How many of `ports` the exporter was seen holding, and by when it held them all."""
        seen = [self.first_held[port] for port in ports if port in self.first_held]
        all_seen = max(seen) if seen and len(seen) == len(ports) else None
        return len(seen), all_seen


def run_flood(
    exporter: ExporterProcess, plan: FloodPlan, path: str, headers: Mapping[str, str]
) -> FloodResult:
    """Flood `exporter` as `plan` says while scraping `path` on new connections."""
    # Spawned, not forked: this process runs threads (the upstream server's).
    context = multiprocessing.get_context("spawn")
    flooding = context.Event()
    connected = context.Event()
    results, sending_end = context.Pipe(duplex=False)
    client = context.Process(
        target=_run_flood_client,
        args=(plan, exporter.port, sending_end, flooding, connected),
        name="flood-client",
        daemon=True,
    )
    # A fresh exporter's first scrapes load modules and connect upstream (40 to 80 ms
    # here): the flood is not what they would time.
    for _ in range(WARMUP_SCRAPES):
        scrape_on_new_connection(exporter.port, path, headers)
    latencies: list[float] = []
    failures = 0
    report: FloodClientReport | None = None
    client.start()
    sending_end.close()
    try:
        # The clock starts with the flood, not with the client's process: a spawned Python
        # takes a while to import, and scrapes meanwhile would time no flood.
        flooding.wait(CLIENT_START_TIMEOUT)
        readings = _ServerReadings(exporter)
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
            readings.read()
            time.sleep(max(0.0, SCRAPE_INTERVAL - (time.monotonic() - tick)))
        # Read while waiting, so a large report never blocks the client in send().
        client_ends = started + plan.accept_within + 1.0 + plan.closed_after + 10.0
        while report is None and time.monotonic() < client_ends:
            readings.read()
            if results.poll(0.05):
                with suppress(EOFError):
                    report = results.recv()
                if report is None:
                    break  # the client ended without a report
        client.join(max(0.0, client_ends - time.monotonic()))
    finally:
        if client.is_alive():
            client.kill()
            client.join()
        results.close()
    if report is None:
        report = FloodClientReport()
    serving_after = scrape_on_new_connection(exporter.port, path, headers) is not None
    accepted, all_accepted_seconds = readings.accepted(report.ports)
    if len(report.ports) < plan.connections:
        all_accepted_seconds = None  # some never connected: never all accepted
    return FloodResult(
        plan,
        report,
        accepted,
        all_accepted_seconds,
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
        f"A fresh exporter with one 2-queue target, scraped {WARMUP_SCRAPES} times first (not",
        f"counted: the first scrape loads modules); then {plan.connections:,} connections opened",
        "at once by one asyncio client in a process of its own (open-files soft limit raised",
        f"to the hard limit, {client.soft_limit:,}), each sending `GET /metrics` and one header",
        "without the blank line that ends them, then reading until the server closes. A",
        "connection counts as accepted once the exporter holds its socket (/proc/<pid>/fd and",
        f"/proc/<pid>/net/tcp, read every {SOCKET_READING_INTERVAL:g} s): connect() returns as",
        "soon as the kernel has queued it. Times count from the client's first connect.",
        "Meanwhile, a scrape on a new connection every",
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
