"""Measure what the exporter costs over the stats API call itself; print a Markdown report.

One local upstream (answers of 2 to 10,000 queues) and one exporter process: scrapes
against direct GETs and against Debian's blackbox_exporter on the same URL (peer.py),
concurrent scrapers, CPU per scrape, memory; then a connection flood on a fresh exporter
(flood.py), a Redis source (tailing.py) and a Redis-only target of 1,000 queues
(redis_only.py). The figures are information: a non-zero exit means something broke,
never that a target was missed; a missed target shows as FAIL in the table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import http.client
import json
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flood import (
    FLOOD_FULL,
    FLOOD_QUICK,
    FloodPlan,
    FloodResult,
    flood_section,
    flood_targets,
    run_flood,
)
from harness import (
    HOST,
    ExporterProcess,
    HarnessError,
    KeepAliveClient,
    LocalHTTPServer,
    QuietHandler,
    http_response,
    percentile,
    sample,
)
from peer import PeerResult, peer_section, peer_targets, run_peer
from redis_only import (
    REDIS_ONLY_FULL,
    REDIS_ONLY_QUICK,
    RedisOnlyPlan,
    RedisOnlyResult,
    redis_only_section,
    redis_only_targets,
    run_redis_only,
)
from tailing import (
    TAIL_FULL,
    TAIL_QUICK,
    TailPlan,
    TailResult,
    hiredis_verdict,
    run_tailing,
    tailing_table,
    tailing_targets,
)

SIZES = (2, 100, 1_000, 10_000)
CRONS = ("*/6 * * * *", "0 */3 * * * *", "*/30 * * * * *")
#: What Prometheus sends; the exporter's upstream deadline is this less 0.5 s.
SCRAPE_HEADERS = {"X-Prometheus-Scrape-Timeout-Seconds": "10"}
CONCURRENCY = (1, 8, 32)
CONCURRENCY_SIZE = 100
MIB = 1024 * 1024
#: Issue 12's targets at 1,000 queues: p50 under 20 ms and under 25 times the direct GET.
P50_TARGET_1000 = 0.020
DIRECT_RATIO_TARGET_1000 = 25.0
#: Issue 12: peak RSS up to 1,000 queues, no Redis connection configured.
PEAK_RSS_TARGET = 35 * MIB


@dataclass(frozen=True, slots=True)
class Plan:
    """How many requests each part of the run makes."""

    scrapes: dict[int, int]
    warmup: int
    concurrent_scrapes: int
    memory_scrapes: int
    #: Rounds of direct GET, exporter scrape and blackbox_exporter probe, 2 queues.
    peer_scrapes: int
    flood: FloodPlan
    tailing: TailPlan
    redis_only: RedisOnlyPlan


FULL = Plan(
    {2: 500, 100: 500, 1_000: 200, 10_000: 20},
    10,
    640,
    10_000,
    500,
    FLOOD_FULL,
    TAIL_FULL,
    REDIS_ONLY_FULL,
)
QUICK = Plan(
    {2: 20, 100: 20, 1_000: 5, 10_000: 2},
    2,
    64,
    200,
    20,
    FLOOD_QUICK,
    TAIL_QUICK,
    REDIS_ONLY_QUICK,
)


def stats_answer(queues: int) -> bytes:
    """An answer shaped like enabled.json with `queues` queues, names and crons varied."""
    answer = sample("enabled")
    template = answer["stats"]["inventory"]
    stats: dict[str, Any] = {}
    for index in range(queues):
        queue = copy.deepcopy(template)
        queue["waiting"] = index % 7
        queue["completed"] = index % 1000
        queue["recurringJobs"]["cron"] = CRONS[index % len(CRONS)]
        stats[f"queue-{index:05d}"] = queue
    stats["redisStatus"] = "enabled"
    answer["stats"] = stats
    return json.dumps(answer).encode()


class Upstream:
    """Pre-built stats answers at /q2, /q100, ... on 127.0.0.1, requests counted per path."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.bodies = {f"/q{size}": stats_answer(size) for size in sizes}
        self._responses = {
            path: http_response(200, "OK", body, "application/json")
            for path, body in self.bodies.items()
        }
        self._not_found = http_response(404, "Not Found", b"not found\n", "text/plain")
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = LocalHTTPServer(0, self._respond)

    @property
    def port(self) -> int:
        return self._server.port

    def requests(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def close(self) -> None:
        self._server.close()

    def _respond(self, handler: QuietHandler) -> None:
        with self._lock:
            self._counts[handler.path] += 1
        # Status line, headers and body in one send: no Nagle stall on keep-alive.
        handler.wfile.write(self._responses.get(handler.path, self._not_found))


def exporter_config(upstream: Upstream, sizes: Sequence[int]) -> str:
    """One target q<size> per size, no Redis anywhere."""
    targets = "".join(
        f"  - name: q{size}\n    url: http://{HOST}:{upstream.port}/q{size}\n    timeout: 30s\n"
        for size in sizes
    )
    return f"targets:\n{targets}limits:\n  max_queues: 20000\nlog:\n  level: error\n"


@dataclass(frozen=True, slots=True)
class SizeResult:
    queues: int
    answer_bytes: int
    exposition_bytes: int
    scrapes: int
    direct: list[float]
    exporter: list[float]
    cpu_seconds: float


@dataclass(frozen=True, slots=True)
class ConcurrencyResult:
    threads: int
    scrapes: int
    latencies: list[float]
    wall_seconds: float
    upstream_requests: int


@dataclass(frozen=True, slots=True)
class MemoryResult:
    rss_idle: int
    scrapes: int
    rss_before: int
    rss_after: int
    peak_small: int
    peak_to_1000: int
    peak_all: int


def measure_size(
    exporter: ExporterProcess, upstream: Upstream, size: int, count: int, warmup: int
) -> SizeResult:
    """`count` scrapes of /probe?target=q<size>, each next to a direct GET of its answer."""
    path = f"/q{size}"
    probe = f"/probe?target=q{size}"
    scraper = KeepAliveClient(exporter.port)
    direct = KeepAliveClient(upstream.port)
    try:
        exposition = b""
        for _ in range(warmup):
            exposition, _ = scraper.get_ok(probe, SCRAPE_HEADERS)
            direct.get_ok(path)
        if b"jobstats_up 1" not in exposition:
            raise HarnessError(f"{probe}: jobstats_up is not 1:\n{exposition[:2000].decode()}")
        direct_times: list[float] = []
        exporter_times: list[float] = []
        cpu_before = exporter.cpu_seconds()
        # Interleaved, so noise on the machine hits both series alike.
        for _ in range(count):
            direct_times.append(direct.get_ok(path)[1])
            exporter_times.append(scraper.get_ok(probe, SCRAPE_HEADERS)[1])
        cpu = exporter.cpu_seconds() - cpu_before
    finally:
        scraper.close()
        direct.close()
    exporter.check_alive()
    return SizeResult(
        size,
        len(upstream.bodies[path]),
        len(exposition),
        count,
        direct_times,
        exporter_times,
        cpu,
    )


def measure_concurrency(
    exporter: ExporterProcess, upstream: Upstream, threads: int, total: int
) -> ConcurrencyResult:
    """`threads` scrapers, each on its own keep-alive connection, share `total` scrapes."""
    probe = f"/probe?target=q{CONCURRENCY_SIZE}"
    each = max(1, total // threads)
    ready = threading.Barrier(threads + 1, timeout=60)
    go = threading.Barrier(threads + 1, timeout=60)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def scrape(index: int) -> None:
        client = KeepAliveClient(exporter.port)
        try:
            client.get_ok(probe, SCRAPE_HEADERS)
            ready.wait()
            go.wait()
            for _ in range(each):
                latencies[index].append(client.get_ok(probe, SCRAPE_HEADERS)[1])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)
            ready.abort()
            go.abort()
        finally:
            client.close()

    workers = [threading.Thread(target=scrape, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    requests_before = 0
    started = time.perf_counter()
    try:
        ready.wait()
        requests_before = upstream.requests(f"/q{CONCURRENCY_SIZE}")
        started = time.perf_counter()
        go.wait()
    except threading.BrokenBarrierError:
        pass
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    if failures:
        exporter.check_alive()
        raise HarnessError(f"a concurrent scraper failed: {failures[0]!r}")
    requests = upstream.requests(f"/q{CONCURRENCY_SIZE}") - requests_before
    merged = [value for values in latencies for value in values]
    return ConcurrencyResult(threads, len(merged), merged, wall, requests)


def measure_memory(exporter: ExporterProcess, scrapes: int, warmup: int) -> MemoryResult:
    """RSS before and after `scrapes` scrapes of the 2-queue target, after `warmup` more."""
    idle = exporter.memory_bytes("VmRSS")
    client = KeepAliveClient(exporter.port)
    try:
        for _ in range(warmup):
            client.get_ok("/probe?target=q2", SCRAPE_HEADERS)
        before = exporter.memory_bytes("VmRSS")
        for _ in range(scrapes):
            client.get_ok("/probe?target=q2", SCRAPE_HEADERS)
        after = exporter.memory_bytes("VmRSS")
    finally:
        client.close()
    exporter.check_alive()
    peak = exporter.memory_bytes("VmHWM")
    return MemoryResult(idle, scrapes, before, after, peak, peak, peak)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def mib(size: float) -> str:
    return f"{size / MIB:.1f}"


def size_table(results: Sequence[SizeResult]) -> list[str]:
    lines = [
        "| queues | answer KiB | exposition KiB | scrapes | direct p50 ms | direct p99 ms"
        " | exporter p50 ms | exporter p99 ms | overhead p50 ms | ratio p50 | CPU ms/scrape |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        direct_p50 = percentile(result.direct, 0.5)
        exporter_p50 = percentile(result.exporter, 0.5)
        lines.append(
            f"| {result.queues:,} | {result.answer_bytes / 1024:.1f}"
            f" | {result.exposition_bytes / 1024:.1f} | {result.scrapes}"
            f" | {ms(direct_p50)} | {ms(percentile(result.direct, 0.99))}"
            f" | {ms(exporter_p50)} | {ms(percentile(result.exporter, 0.99))}"
            f" | {ms(exporter_p50 - direct_p50)} | {exporter_p50 / direct_p50:.1f}"
            f" | {ms(result.cpu_seconds / result.scrapes)} |"
        )
    return lines


def concurrency_table(results: Sequence[ConcurrencyResult]) -> list[str]:
    lines = [
        f"| scrapers | scrapes of {CONCURRENCY_SIZE} queues | p50 ms | p99 ms | scrapes/s"
        " | upstream requests | upstream requests per scrape |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        lines.append(
            f"| {result.threads} | {result.scrapes} | {ms(percentile(result.latencies, 0.5))}"
            f" | {ms(percentile(result.latencies, 0.99))}"
            f" | {result.scrapes / result.wall_seconds:.0f} | {result.upstream_requests}"
            f" | {result.upstream_requests / result.scrapes:.2f} |"
        )
    return lines


def memory_table(memory: MemoryResult) -> list[str]:
    growth = memory.rss_after - memory.rss_before
    return [
        "| memory | MiB |",
        "| --- | ---: |",
        f"| RSS once started, before any scrape | {mib(memory.rss_idle)} |",
        f"| RSS before {memory.scrapes:,} scrapes of 2 queues | {mib(memory.rss_before)} |",
        f"| RSS after them | {mib(memory.rss_after)} |",
        f"| RSS growth over them | {mib(growth)} |",
        f"| peak RSS (VmHWM) after them | {mib(memory.peak_small)} |",
        f"| peak RSS up to 1,000 queues | {mib(memory.peak_to_1000)} |",
        f"| peak RSS of the whole run, 10,000 queues included | {mib(memory.peak_all)} |",
    ]


@dataclass(frozen=True, slots=True)
class BenchResults:
    """Every part of one run; a `str` part is the reason it was skipped."""

    sizes: list[SizeResult]
    peer: PeerResult | str
    concurrency: list[ConcurrencyResult]
    memory: MemoryResult
    flood: FloodResult
    tailing: list[TailResult] | str
    redis_only: RedisOnlyResult | str


#: A target's verdict: True pass, False FAIL, None skipped (what it needs is missing).
TargetRow = tuple[str, str, bool | None]


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "skipped"
    return "pass" if ok else "FAIL"


def targets_table(results: BenchResults) -> list[str]:
    by_size = {result.queues: result for result in results.sizes}
    memory = results.memory
    rows: list[TargetRow] = []
    if 2 in by_size:
        two = by_size[2]
        added = percentile(two.exporter, 0.5) - percentile(two.direct, 0.5)
        rows.append(
            (
                "2 queues: exporter adds < 1.5 ms p50 over the direct GET",
                f"{ms(added)} ms",
                added < 0.0015,
            )
        )
    if isinstance(results.peer, str):
        rows.append(
            ("2 queues: exporter overhead p50 against blackbox_exporter's", results.peer, None)
        )
    else:
        rows += peer_targets(results.peer)
    if 1_000 in by_size:
        thousand = by_size[1_000]
        p50 = percentile(thousand.exporter, 0.5)
        ratio = p50 / percentile(thousand.direct, 0.5)
        rows.append(
            (
                f"1,000 queues: scrape < {ms(P50_TARGET_1000)} ms p50",
                f"{ms(p50)} ms",
                p50 < P50_TARGET_1000,
            )
        )
        rows.append(
            (
                f"1,000 queues: scrape p50 < {DIRECT_RATIO_TARGET_1000:g} x the direct GET's",
                f"{ratio:.1f} x",
                ratio < DIRECT_RATIO_TARGET_1000,
            )
        )
    rows.append(
        (
            f"peak RSS < {mib(PEAK_RSS_TARGET)} MiB up to 1,000 queues, no Redis configured",
            f"{mib(memory.peak_to_1000)} MiB",
            memory.peak_to_1000 < PEAK_RSS_TARGET,
        )
    )
    growth = memory.rss_after - memory.rss_before
    rows.append(
        (
            f"no RSS growth over {memory.scrapes:,} scrapes (< 1 MiB)",
            f"{mib(growth)} MiB",
            growth < MIB,
        )
    )
    rows += flood_targets(results.flood)
    if not isinstance(results.tailing, str):
        rows += tailing_targets(results.tailing)
    if not isinstance(results.redis_only, str):
        rows += redis_only_targets(results.redis_only)
    lines = ["| target | measured | result |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in rows]
    return lines


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text("utf-8").splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    memory = "unknown"
    for line in Path("/proc/meminfo").read_text("utf-8").splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- memory: {memory}",
        f"- Python: {platform.python_implementation()} {platform.python_version()}",
        f"- OS: {platform.platform()}",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


def tailing_section(tailing: Sequence[TailResult] | str) -> list[str]:
    lines = [
        "## Redis source: tailing the event streams",
        "",
        "Debian's redis-server on 127.0.0.1; 10 queues (meta hashes with `opts.maxLenEvents`",
        "10000); `benchmarks/producer.py`, a process of its own, writes BullMQ's entries",
        "(waiting, active, then completed or, one job in ten, failed; XADD MAXLEN ~ 10000)",
        "round-robin into their streams, paced to the rate. The exporter, a target with this",
        "Redis and a fixed stats API, follows every stream from before the first entry and is",
        "scraped once a second. CPU is user + system time, as a fraction of one core, over",
        "the producer's run; catch-up is how long after the producer's last entry /metrics",
        "counted every job. The exporter runs once with redis-py's hiredis parser and once",
        "with hiredis made unimportable in its process; the producer is the same in both.",
        "",
    ]
    if isinstance(tailing, str):
        return [*lines, tailing, ""]
    return [*lines, *tailing_table(tailing), "", hiredis_verdict(tailing), ""]


def report(quick: bool, results: BenchResults) -> str:
    lines = [
        "# jobstats-exporter benchmark",
        "",
        "Written by `python benchmarks/bench.py --results benchmarks/RESULTS.md`"
        + (" (--quick: too few scrapes to mean anything)." if quick else "."),
        "One local upstream and one exporter process, measured in one run: compare the",
        "ratios, not the absolute times. Keep-alive on both sides, as Prometheus scrapes.",
        "",
        "## Machine",
        "",
        *machine(),
        "",
        "## Targets",
        "",
        *targets_table(results),
        "",
        "## Scrape latency by answer size",
        "",
        "`/probe?target=qN` against a direct GET of the same upstream answer, interleaved;",
        "CPU is the exporter process' user + system time over those scrapes.",
        "",
        *size_table(results.sizes),
        "",
        *peer_section(results.peer),
        "## Concurrent scrapers",
        "",
        "Each scraper has its own keep-alive connection; concurrent scrapes of one target",
        "share the upstream request in flight, so fewer requests than scrapes reach it.",
        "",
        *concurrency_table(results.concurrency),
        "",
        "## Memory",
        "",
        *memory_table(results.memory),
        "",
        *flood_section(results.flood),
        *tailing_section(results.tailing),
        *redis_only_section(results.redis_only),
    ]
    return "\n".join(lines)


def run(plan: Plan, progress: Callable[[str], None]) -> BenchResults:
    upstream = Upstream(SIZES)
    try:
        exporter = ExporterProcess(exporter_config(upstream, SIZES))
        try:
            progress(f"memory: {plan.memory_scrapes} scrapes of 2 queues")
            memory = measure_memory(exporter, plan.memory_scrapes, plan.warmup * 10)
            progress(f"peer: {plan.peer_scrapes} rounds against blackbox_exporter, 2 queues")
            peer = run_peer(
                exporter, upstream.port, 2, plan.peer_scrapes, plan.warmup, SCRAPE_HEADERS
            )
            sizes = []
            peak_to_1000 = 0
            for size in SIZES:
                progress(f"latency: {plan.scrapes[size]} scrapes of {size} queues")
                sizes.append(
                    measure_size(exporter, upstream, size, plan.scrapes[size], plan.warmup)
                )
                if size == 1_000:
                    peak_to_1000 = exporter.memory_bytes("VmHWM")
            concurrency = []
            for threads in CONCURRENCY:
                progress(f"concurrency: {threads} scrapers")
                concurrency.append(
                    measure_concurrency(exporter, upstream, threads, plan.concurrent_scrapes)
                )
            memory = replace(
                memory, peak_to_1000=peak_to_1000, peak_all=exporter.memory_bytes("VmHWM")
            )
            exporter.check_alive()
        finally:
            exporter.stop()
        progress(f"flood: {plan.flood.connections:,} connections sending half a request")
        # A fresh exporter, so the flood's peak RSS is its own and no phase above sees it.
        flooded = ExporterProcess(exporter_config(upstream, (2,)))
        try:
            flood = run_flood(flooded, plan.flood, "/probe?target=q2", SCRAPE_HEADERS)
        finally:
            flooded.stop()
    finally:
        upstream.close()
    tailing = run_tailing(plan.tailing, progress)
    redis_only = run_redis_only(plan.redis_only, progress)
    return BenchResults(sizes, peer, concurrency, memory, flood, tailing, redis_only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="a few scrapes of each: proves it runs"
    )
    parser.add_argument("--results", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    try:
        results = run(plan, progress)
    except (HarnessError, OSError, http.client.HTTPException) as error:
        print(f"bench: failed: {error}", file=sys.stderr)
        return 1
    text = report(args.quick, results)
    print(text)
    if args.results:
        args.results.write_text(text, encoding="utf-8")
        progress(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
