"""Scrape the exporter non-stop while its upstream cycles through every fault, and back.

Phases: ok, down, slow, HTTP 500, garbage, huge, Redis down, ok. Every scrape must answer
200 within its timeout with the phase's `jobstats_up`; RSS and open fds must stay flat.
Exits 1 on any violation. Speed beyond the scrape timeout is bench.py's business.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness import (
    HOST,
    ExporterProcess,
    HarnessError,
    KeepAliveClient,
    LocalHTTPServer,
    QuietHandler,
    http_response,
    sample,
)

#: What every scrape says Prometheus' timeout is; the exporter's deadline is this less 0.5 s.
SCRAPE_TIMEOUT = 2.0
MAX_BODY_SIZE = 64 * 1024
#: Seconds a slow upstream waits before answering: past any deadline the exporter may use.
SLOW_SECONDS = 3.0
#: A scrape that began this soon after a phase change may still show the previous phase:
#: the upstream sees the request a little after the scrape starts.
STRADDLE_GRACE = 0.25
SCRAPERS = 2
#: Allowed growth of the exporter between start (after warm-up) and end.
MAX_FD_GROWTH = 5
MAX_RSS_GROWTH = 5 * 1024 * 1024
#: `jobstats_up` expected in each phase, in the order of one cycle.
EXPECTED_UP = {
    "ok": 1,
    "down": 0,
    "slow": 0,
    "http_500": 0,
    "garbage": 0,
    "huge": 0,
    "redis_down": 1,
}
CYCLE = tuple(EXPECTED_UP)
#: The reason each failing phase must have been counted under, by the end.
EXPECTED_REASON = {
    "down": "connect",
    "slow": "timeout",
    "http_500": "http_status",
    "garbage": "invalid_json",
    "huge": "too_large",
}
_UP = re.compile(rb"^jobstats_up (\S+)$", re.MULTILINE)
_ERRORS = re.compile(rb'^jobstats_scrape_errors_total\{reason="(\w+)"\} (\S+)$', re.MULTILINE)


def huge_answer() -> bytes:
    """A valid stats answer larger than the exporter's max_body_size."""
    answer = sample("enabled")
    template = answer["stats"]["inventory"]
    stats = {f"queue-{index:05d}": template for index in range(2 * MAX_BODY_SIZE // 150)}
    answer["stats"] = {**stats, "redisStatus": "enabled"}
    return json.dumps(answer).encode()


class PhasedUpstream:
    """The stats API on one fixed 127.0.0.1 port, misbehaving as its current phase says."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = "ok"
        self._stopping = threading.Event()
        ok = json.dumps(sample("enabled")).encode()
        huge = huge_answer()
        # The same, its length undeclared: the exporter must stop reading at its cap.
        self._huge_undeclared = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + huge
        )
        self._huge_answers = 0
        self._responses = {
            "ok": http_response(200, "OK", ok, "application/json"),
            "slow": http_response(200, "OK", ok, "application/json"),
            "http_500": http_response(
                500, "Internal Server Error", b'{"success": false}', "application/json"
            ),
            "garbage": http_response(
                200, "OK", b"<html><body>502 Bad Gateway</body></html>", "text/html"
            ),
            "huge": http_response(200, "OK", huge, "application/json"),
            "redis_down": http_response(
                200, "OK", json.dumps(sample("redis-down")).encode(), "application/json"
            ),
        }
        self._server: LocalHTTPServer | None = LocalHTTPServer(0, self._respond)
        self.port = self._server.port

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase

    def start(self) -> None:
        """Listen again, on the same port."""
        self._stopping = threading.Event()
        self._server = LocalHTTPServer(self.port, self._respond)

    def stop(self) -> None:
        """Close the listening socket and every open connection: connections are refused."""
        if self._server is not None:
            self._stopping.set()
            self._server.close()
            self._server = None

    def _respond(self, handler: QuietHandler) -> None:
        phase = self.phase
        if phase == "down":
            # A request that slipped in while the listener was closing: hang up.
            handler.close_connection = True
            return
        if phase == "slow" and self._stopping.wait(SLOW_SECONDS):
            handler.close_connection = True
            return
        if phase == "huge":
            with self._lock:
                self._huge_answers += 1
                undeclared = self._huge_answers % 2 == 0
            if undeclared:
                handler.close_connection = True
                handler.wfile.write(self._huge_undeclared)
                return
        handler.wfile.write(self._responses[phase])


@dataclass(frozen=True, slots=True)
class Scrape:
    started: float
    ended: float
    status: int
    up: int | None
    error: str = ""


@dataclass(slots=True)
class Timeline:
    """When each phase began (time.monotonic), for judging scrapes afterwards."""

    starts: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)

    def begin(self, phase: str) -> None:
        self.starts.append(time.monotonic())
        self.phases.append(phase)

    def phase_at(self, moment: float) -> str:
        return self.phases[max(0, bisect.bisect_right(self.starts, moment) - 1)]

    def straddles(self, scrape: Scrape) -> bool:
        """True when a phase began while the scrape ran, or just before it started."""
        first = bisect.bisect_right(self.starts, scrape.started - STRADDLE_GRACE)
        return first < len(self.starts) and self.starts[first] <= scrape.ended and first > 0


def scrape_forever(port: int, stop: threading.Event, into: list[Scrape]) -> None:
    """Scrape /metrics over one keep-alive connection until `stop` is set."""
    client = KeepAliveClient(port, timeout=SCRAPE_TIMEOUT * 5)
    headers = {"X-Prometheus-Scrape-Timeout-Seconds": f"{SCRAPE_TIMEOUT:g}"}
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, body, _ = client.get("/metrics", headers)
            except (OSError, http.client.HTTPException) as error:
                into.append(Scrape(started, time.monotonic(), 0, None, repr(error)))
                client.close()
                client = KeepAliveClient(port, timeout=SCRAPE_TIMEOUT * 5)
                stop.wait(0.1)
                continue
            match = _UP.search(body)
            up = int(float(match[1])) if match else None
            into.append(Scrape(started, time.monotonic(), status, up))
    finally:
        client.close()


def settled_fds(exporter: ExporterProcess) -> int:
    """Open fds once two readings 0.2 s apart agree (closing connections take a moment)."""
    previous = exporter.open_fds()
    for _ in range(10):
        time.sleep(0.2)
        current = exporter.open_fds()
        if current == previous:
            return current
        previous = current
    return previous


@dataclass(slots=True)
class PhaseTally:
    scrapes: int = 0
    checked: int = 0
    up: int = 0
    down: int = 0
    slowest: float = 0.0
    violations: int = 0


def judge(
    scrapes: Sequence[Scrape], timeline: Timeline, timing: bool
) -> tuple[dict[str, PhaseTally], list[str]]:
    """Tallies per phase, and one line per violation."""
    tallies = {phase: PhaseTally() for phase in CYCLE}
    violations: list[str] = []
    origin = timeline.starts[0]
    for scrape in sorted(scrapes, key=lambda s: s.started):
        phase = timeline.phase_at(scrape.started)
        tally = tallies[phase]
        tally.scrapes += 1
        elapsed = scrape.ended - scrape.started
        tally.slowest = max(tally.slowest, elapsed)
        if scrape.up == 1:
            tally.up += 1
        elif scrape.up == 0:
            tally.down += 1
        where = f"t={scrape.started - origin:.2f}s {phase}"
        problems = []
        if scrape.status != 200:
            problems.append(f"HTTP {scrape.status or 'none'} {scrape.error}".strip())
        if timing and elapsed > SCRAPE_TIMEOUT:
            problems.append(f"took {elapsed:.2f}s, over the {SCRAPE_TIMEOUT:g}s scrape timeout")
        if not timeline.straddles(scrape):
            tally.checked += 1
            if scrape.status == 200 and scrape.up != EXPECTED_UP[phase]:
                problems.append(f"jobstats_up {scrape.up}, expected {EXPECTED_UP[phase]}")
        if problems:
            tally.violations += 1
            violations.append(f"{where}: {'; '.join(problems)}")
    for phase, tally in tallies.items():
        if tally.checked == 0:
            violations.append(f"{phase}: no scrape fell wholly inside the phase; nothing checked")
    return tallies, violations


def exporter_config(upstream: PhasedUpstream) -> str:
    return (
        "api:\n"
        f"  url: http://{HOST}:{upstream.port}/api/jobs/stats\n"
        "  timeout: 10s\n"
        f"  max_body_size: {MAX_BODY_SIZE // 1024}KiB\n"
        "log:\n"
        "  level: error\n"
    )


@dataclass(slots=True)
class Readings:
    """The exporter's RSS (bytes) and open fds: at start, each cycle's start, and end."""

    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def take(self, exporter: ExporterProcess, settle: bool = False) -> None:
        self.rss.append(exporter.memory_bytes("VmRSS"))
        self.fds.append(settled_fds(exporter) if settle else exporter.open_fds())


def run(phase_seconds: float, cycles: int, timing: bool) -> int:
    upstream = PhasedUpstream()
    try:
        exporter = ExporterProcess(exporter_config(upstream))
    except BaseException:
        upstream.stop()
        raise
    stop = threading.Event()
    results: list[list[Scrape]] = [[] for _ in range(SCRAPERS)]
    scrapers = [
        threading.Thread(target=scrape_forever, args=(exporter.port, stop, into))
        for into in results
    ]
    timeline = Timeline()
    readings = Readings()
    try:
        warmup = KeepAliveClient(exporter.port)
        for _ in range(50):
            warmup.get_ok("/metrics")
        warmup.close()
        readings.take(exporter, settle=True)
        timeline.begin("ok")
        for scraper in scrapers:
            scraper.start()
        phases = [*CYCLE * cycles, "ok"]
        for index, phase in enumerate(phases):
            if index:
                print(f"soak: phase {phase}", file=sys.stderr, flush=True)
                enter(upstream, timeline, phase, previous=phases[index - 1])
                if phase == "ok":
                    readings.take(exporter)
            # The slow phase gets twice as long: each of its scrapes lasts a deadline.
            time.sleep(phase_seconds * (2 if phase == "slow" else 1))
            exporter.check_alive()
        stop.set()
        for scraper in scrapers:
            scraper.join()
        exporter.check_alive()
        last = KeepAliveClient(exporter.port)
        body, _ = last.get_ok("/metrics")
        last.close()
        errors = {reason.decode(): int(float(count)) for reason, count in _ERRORS.findall(body)}
        readings.take(exporter, settle=True)
    finally:
        stop.set()
        for scraper in scrapers:
            if scraper.is_alive():
                scraper.join()
        exporter.stop()
        upstream.stop()

    scrapes = [scrape for into in results for scrape in into]
    tallies, violations = judge(scrapes, timeline, timing)
    for phase, reason in EXPECTED_REASON.items():
        if not errors.get(reason):
            violations.append(f"{phase}: no failed scrape counted under reason {reason}")
    if readings.fds[-1] - readings.fds[0] > MAX_FD_GROWTH:
        violations.append(f"open fds grew from {readings.fds[0]} to {readings.fds[-1]}")
    if readings.rss[-1] - readings.rss[0] > MAX_RSS_GROWTH:
        violations.append(f"RSS grew from {mib(readings.rss[0])} to {mib(readings.rss[-1])} MiB")
    print(summary(scrapes, tallies, violations, timing, readings, errors))
    return 1 if violations else 0


def enter(upstream: PhasedUpstream, timeline: Timeline, phase: str, previous: str) -> None:
    """Switch the upstream to `phase`, so that its timeline entry is never late."""
    if phase == "down":
        upstream.phase = phase
        timeline.begin(phase)
        upstream.stop()
        return
    if previous == "down":
        # Listening again while the phase still says down: those scrapes expect up 0.
        upstream.start()
    upstream.phase = phase
    timeline.begin(phase)


def mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


def summary(
    scrapes: Sequence[Scrape],
    tallies: dict[str, PhaseTally],
    violations: Sequence[str],
    timing: bool,
    readings: Readings,
    errors: dict[str, int],
) -> str:
    lines = [
        "# jobstats-exporter soak",
        "",
        f"{len(scrapes)} scrapes by {SCRAPERS} scrapers, scrape timeout {SCRAPE_TIMEOUT:g}s"
        + ("" if timing else " (not judged: --no-timing)")
        + f"; {len(violations)} violations.",
        "",
        "| phase | expected up | scrapes | checked | up=1 | up=0 | slowest s | violations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase, tally in tallies.items():
        lines.append(
            f"| {phase} | {EXPECTED_UP[phase]} | {tally.scrapes} | {tally.checked} | {tally.up}"
            f" | {tally.down} | {tally.slowest:.3f} | {tally.violations} |"
        )
    lines += [
        "",
        "Checked: scrapes wholly inside one phase, whose `jobstats_up` is judged; a scrape",
        "that straddles a change may show either phase (and take the earlier one's time).",
        "",
        "| exporter | start | end | at each return to ok |",
        "| --- | ---: | ---: | --- |",
        f"| RSS MiB | {mib(readings.rss[0])} | {mib(readings.rss[-1])}"
        f" | {', '.join(mib(rss) for rss in readings.rss[1:-1])} |",
        f"| open fds | {readings.fds[0]} | {readings.fds[-1]}"
        f" | {', '.join(str(fds) for fds in readings.fds[1:-1])} |",
        "",
        "The exporter's `jobstats_scrape_errors_total` at the end: "
        + ", ".join(f"{reason} {count}" for reason, count in errors.items())
        + ".",
    ]
    if violations:
        lines += ["", "Violations (first 20):", *(f"- {line}" for line in violations[:20])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="about how long to run (default 120)"
    )
    parser.add_argument("--quick", action="store_true", help="one pass through every phase")
    parser.add_argument(
        "--no-timing",
        action="store_true",
        help="do not judge scrape durations (for a loaded machine, such as the test suite)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        phase_seconds, cycles = 1.6, 1
    else:
        # A cycle is the phases once, slow twice as long, then the final ok.
        phase_seconds = 3.0
        cycles = max(1, round(args.seconds / (phase_seconds * (len(CYCLE) + 1))))
    try:
        return run(phase_seconds, cycles, timing=not args.no_timing)
    except (HarnessError, OSError, http.client.HTTPException) as error:
        print(f"soak: failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
