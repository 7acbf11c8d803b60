"""Whether the Redis source's tailer keeps up with a busy BullMQ, and what it costs.

Debian's redis-server on 127.0.0.1, a synthetic producer process (producer.py) writing
BullMQ-shaped events into 10 streams, and an exporter process following them: its CPU,
its peak RSS, and whether its counters equal what was written, with hiredis and without.
Every process is started here and stopped by its PID; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from harness import (
    HOST,
    ExporterProcess,
    HarnessError,
    KeepAliveClient,
    LocalHTTPServer,
    QuietHandler,
    cpu_seconds,
    free_port,
    http_response,
    sample,
    stop_process,
)
from producer import create_queues, queue_names
from prometheus_client.parser import text_string_to_metric_families

PRODUCER = Path(__file__).resolve().parent / "producer.py"
PREFIX = "bull"
QUEUES = 10
#: Seconds between scrapes of /metrics while the producer writes, as a busy Prometheus.
SCRAPE_INTERVAL = 1.0
#: Seconds the exporter has, once the producer is done, to count what is left.
CATCH_UP_TIMEOUT = 20.0
MIB = 1024 * 1024
#: The issue's targets for the tailer at 20,000 events/s.
CPU_TARGET = 0.25
RSS_TARGET = 50 * MIB


@dataclass(frozen=True, slots=True)
class TailPlan:
    """How hard and how long the producer writes, and how often each variant runs."""

    rate: float
    seconds: float
    repeats: int


TAIL_FULL = TailPlan(20_000, 30, 2)
TAIL_QUICK = TailPlan(2_000, 1, 1)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    #: Modules the exporter process cannot import.
    without: tuple[str, ...]


WITH_HIREDIS = Variant("hiredis", ())
WITHOUT_HIREDIS = Variant("pure Python parser", ("hiredis",))


@dataclass(frozen=True, slots=True)
class TailResult:
    variant: str
    planned_rate: float
    #: The hiredis extension was mapped into the exporter process.
    hiredis_loaded: bool
    events: int
    producer_seconds: float
    written: tuple[int, int]
    counted: tuple[int, int]
    queues_exact: int
    missed: int
    longest_stream: int
    catch_up_seconds: float | None
    cpu_seconds: float
    producer_cpu_seconds: float
    redis_cpu_seconds: float
    peak_rss: int
    scrapes: int

    @property
    def kept_up(self) -> bool:
        return self.missed == 0 and self.queues_exact == QUEUES and self.written == self.counted

    @property
    def rate(self) -> float:
        return self.events / self.producer_seconds

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_seconds / self.producer_seconds

    @property
    def cpu_at_planned_rate(self) -> float:
        """The exporter's CPU per event times the planned rate: the load the target names,
        also when a busy machine kept the producer below it."""
        return self.cpu_seconds / self.events * self.planned_rate


class RedisServerProcess:
    """Debian's redis-server on 127.0.0.1, no persistence, in a temporary folder."""

    def __init__(self, binary: str) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="jobstats-bench-redis-")
        self.port = free_port()
        self._log = Path(self._folder.name) / "redis.log"
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    HOST,
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self._folder.name,
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.client = redis.Redis(host=HOST, port=self.port, decode_responses=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"redis-server exited:\n{self._log.read_text('utf-8')}")
            try:
                if self.client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise HarnessError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL after 10 s; removes its folder."""
        self.client.close()
        stop_process(self.process)
        self._folder.cleanup()


class StatsApi:
    """The stats API the exporter's target needs beside its Redis: one fixed answer."""

    def __init__(self) -> None:
        self._answer = http_response(
            200, "OK", json.dumps(sample("enabled")).encode(), "application/json"
        )
        self._server = LocalHTTPServer(0, self._respond)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.port}/api/jobs/stats"

    def close(self) -> None:
        self._server.close()

    def _respond(self, handler: QuietHandler) -> None:
        handler.wfile.write(self._answer)


def exporter_config(api: StatsApi, server: RedisServerProcess) -> str:
    # discovery_interval stays at its default, as a user would run it.
    return (
        "targets:\n"
        "  - name: shop\n"
        f"    url: {api.url}\n"
        "    timeout: 5s\n"
        "    redis:\n"
        f"      url: {server.url}\n"
        f"      prefix: {PREFIX}\n"
        "log:\n"
        "  level: warn\n"
    )


def counters(scraper: KeepAliveClient) -> dict[str, dict[str, int]]:
    """The Redis source's counters on /metrics: family name to queue to value."""
    body, _ = scraper.get_ok("/metrics")
    found: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for item in family.samples:
            if item.name in (
                "jobstats_queue_jobs_completed_total",
                "jobstats_queue_jobs_failed_total",
                "jobstats_queue_events_missed_total",
            ):
                found.setdefault(item.name, {})[item.labels["queue"]] = int(item.value)
    return found


def hiredis_mapped(pid: int) -> bool:
    """Whether the hiredis extension is loaded in process `pid` (/proc/<pid>/maps)."""
    return "hiredis" in Path(f"/proc/{pid}/maps").read_text("utf-8", errors="replace")


def measure_tailing(
    server: RedisServerProcess, api: StatsApi, variant: Variant, plan: TailPlan
) -> TailResult:
    """One run: empty Redis, 10 queues, the exporter following them, then the producer."""
    names = queue_names(QUEUES)
    server.client.flushall()
    create_queues(server.client, PREFIX, names)
    exporter = ExporterProcess(exporter_config(api, server), without_modules=variant.without)
    scraper = KeepAliveClient(exporter.port)
    try:
        _wait_following(exporter, scraper, names)
        loaded = hiredis_mapped(exporter.pid)
        redis_pid = server.process.pid
        cpu_before = exporter.cpu_seconds()
        redis_before = cpu_seconds(redis_pid)
        producer = subprocess.Popen(
            [
                sys.executable,
                str(PRODUCER),
                "--url",
                server.url,
                "--prefix",
                PREFIX,
                "--queues",
                str(QUEUES),
                "--rate",
                str(plan.rate),
                "--seconds",
                str(plan.seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        scrapes = 0
        producer_cpu = 0.0
        try:
            while producer.poll() is None:
                counters(scraper)
                scrapes += 1
                exporter.check_alive()
                # Read while it still exists: a reaped process has no /proc entry.
                producer_cpu = cpu_seconds(producer.pid)
                time.sleep(SCRAPE_INTERVAL)
            cpu_used = exporter.cpu_seconds() - cpu_before
            redis_cpu = cpu_seconds(redis_pid) - redis_before
            out, err = producer.communicate(timeout=30)
        finally:
            if producer.poll() is None:
                producer.kill()
                producer.wait(10)
        if producer.returncode != 0:
            raise HarnessError(f"the producer exited with {producer.returncode}:\n{err}")
        written = json.loads(out)
        expected = {"completed": written["completed"], "failed": written["failed"]}
        catch_up = _catch_up(scraper, expected)
        seen = counters(scraper)
        exporter.check_alive()
        peak = exporter.memory_bytes("VmHWM")
        longest = max(int(server.client.xlen(f"{PREFIX}:{name}:events")) for name in names)
    finally:
        scraper.close()
        exporter.stop()
    completed = seen.get("jobstats_queue_jobs_completed_total", {})
    failed = seen.get("jobstats_queue_jobs_failed_total", {})
    exact = sum(
        completed.get(name) == expected["completed"][name]
        and failed.get(name) == expected["failed"][name]
        for name in names
    )
    return TailResult(
        variant.name,
        plan.rate,
        loaded,
        int(written["events"]),
        float(written["seconds"]),
        (sum(expected["completed"].values()), sum(expected["failed"].values())),
        (sum(completed.values()), sum(failed.values())),
        exact,
        sum(seen.get("jobstats_queue_events_missed_total", {}).values()),
        longest,
        catch_up,
        cpu_used,
        # The producer's CPU up to its last sample, about a second short of its whole run.
        producer_cpu,
        redis_cpu,
        peak,
        scrapes,
    )


def _wait_following(
    exporter: ExporterProcess, scraper: KeepAliveClient, names: Sequence[str]
) -> None:
    """Until every queue's counters are on /metrics: the tailer follows them all."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        exporter.check_alive()
        following = counters(scraper).get("jobstats_queue_jobs_completed_total", {})
        if all(name in following for name in names):
            return
        time.sleep(0.1)
    raise HarnessError("the exporter did not follow every queue's stream within 30 s")


def _catch_up(scraper: KeepAliveClient, expected: dict[str, dict[str, int]]) -> float | None:
    """Seconds until /metrics counts every job written, or None when it never does."""
    started = time.monotonic()
    while time.monotonic() - started < CATCH_UP_TIMEOUT:
        seen = counters(scraper)
        if all(
            seen.get(f"jobstats_queue_jobs_{kind}_total", {}) == expected[kind]
            for kind in ("completed", "failed")
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def variants() -> list[Variant]:
    """Without hiredis always; with it when it is installed here."""
    found = importlib.util.find_spec("hiredis") is not None
    return [WITHOUT_HIREDIS, WITH_HIREDIS] if found else [WITHOUT_HIREDIS]


def run_tailing(plan: TailPlan, progress: Callable[[str], None]) -> list[TailResult] | str:
    """Every variant `plan.repeats` times, interleaved; or why the section was skipped."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "skipped: no redis-server on PATH (`make system-deps` installs Debian's)"
    results = []
    server = RedisServerProcess(binary)
    api = StatsApi()
    try:
        for repeat in range(plan.repeats):
            for variant in variants():
                progress(
                    f"redis: {plan.rate:,.0f} events/s for {plan.seconds:g} s,"
                    f" {variant.name} ({repeat + 1}/{plan.repeats})"
                )
                results.append(measure_tailing(server, api, variant, plan))
    except redis.RedisError as error:
        raise HarnessError(f"the bench's own Redis commands failed: {error!r}") from error
    finally:
        api.close()
        server.stop()
    return results


# --- the report --------------------------------------------------------------------------


def _mib(size: float) -> str:
    return f"{size / MIB:.1f}"


def tailing_table(results: Sequence[TailResult]) -> list[str]:
    lines = [
        "| parser | hiredis loaded | events | events/s | completed written / counted"
        " | failed written / counted | queues exact | missed | longest stream | catch-up s"
        " | exporter CPU | exporter µs/event | exporter CPU at planned rate | producer CPU"
        " | redis-server CPU | exporter peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:"
        " | ---: | ---: | ---: |",
    ]
    for result in results:
        seconds = result.producer_seconds
        catch_up = "never" if result.catch_up_seconds is None else f"{result.catch_up_seconds:.2f}"
        lines.append(
            f"| {result.variant} | {'yes' if result.hiredis_loaded else 'no'}"
            f" | {result.events:,} | {result.events / seconds:,.0f}"
            f" | {result.written[0]:,} / {result.counted[0]:,}"
            f" | {result.written[1]:,} / {result.counted[1]:,}"
            f" | {result.queues_exact}/{QUEUES} | {result.missed:,} | {result.longest_stream:,}"
            f" | {catch_up} | {result.cpu_fraction:.3f}"
            f" | {result.cpu_seconds / result.events * 1e6:.1f}"
            f" | {result.cpu_at_planned_rate:.3f}"
            f" | {result.producer_cpu_seconds / seconds:.3f}"
            f" | {result.redis_cpu_seconds / seconds:.3f} | {_mib(result.peak_rss)} |"
        )
    return lines


def _by_variant(results: Sequence[TailResult]) -> dict[str, list[TailResult]]:
    grouped: dict[str, list[TailResult]] = {}
    for result in results:
        grouped.setdefault(result.variant, []).append(result)
    return grouped


def tailing_targets(results: Sequence[TailResult]) -> list[tuple[str, str, bool]]:
    """Rows for the targets table: keeping up, CPU and peak RSS of what is shipped.

    hiredis is a dependency, so the targets are its runs; the pure-Python parser is only
    the comparison (the table and the verdict below show it). Without hiredis installed
    here, its runs are all there is, and they are judged.
    """
    rows: list[tuple[str, str, bool]] = []
    by_variant = _by_variant(results)
    if WITH_HIREDIS.name in by_variant:
        by_variant = {WITH_HIREDIS.name: by_variant[WITH_HIREDIS.name]}
    for name, runs in by_variant.items():
        rate = min(run.rate for run in runs)
        kept = sum(run.kept_up for run in runs)
        rows.append(
            (
                f"Redis, {name}: {rate:,.0f} events/s (slowest run) into {QUEUES} streams,"
                " nothing missed, counters exact",
                f"{kept}/{len(runs)} runs",
                kept == len(runs),
            )
        )
        cpu = max(run.cpu_at_planned_rate for run in runs)
        planned = runs[0].planned_rate
        rows.append(
            (
                f"Redis, {name}: exporter CPU < {CPU_TARGET} of one core at {planned:,.0f}"
                " events/s (CPU per event x rate, worst run)",
                f"{cpu:.3f}",
                cpu < CPU_TARGET,
            )
        )
        peak = max(run.peak_rss for run in runs)
        rows.append(
            (
                f"Redis, {name}: exporter peak RSS < {_mib(RSS_TARGET)} MiB",
                f"{_mib(peak)} MiB",
                peak < RSS_TARGET,
            )
        )
    return rows


def hiredis_verdict(results: Sequence[TailResult]) -> str:
    """What hiredis saves in the exporter's CPU, from the mean of each variant's runs."""
    grouped = _by_variant(results)
    without = grouped.get(WITHOUT_HIREDIS.name)
    with_it = grouped.get(WITH_HIREDIS.name)
    if not without or not with_it:
        return "hiredis is not installed here: only the pure-Python parser was measured."
    plain = sum(run.cpu_at_planned_rate for run in without) / len(without)
    fast = sum(run.cpu_at_planned_rate for run in with_it) / len(with_it)
    rss = max(run.peak_rss for run in with_it) - max(run.peak_rss for run in without)
    return (
        f"hiredis: exporter CPU at {with_it[0].planned_rate:,.0f} events/s {fast:.3f} of a core"
        f" against {plain:.3f} without it"
        f" ({(plain - fast) / plain:.0%} less), peak RSS {rss / MIB:+.1f} MiB."
    )
