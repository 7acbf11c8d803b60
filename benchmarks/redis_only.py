"""What a scrape of a Redis-only target costs: the whole card of 1,000 queues from Redis.

Debian's redis-server on 127.0.0.1 holds BullMQ-shaped queues written directly with
redis-py (meta hash, a few waiting jobs, completed, failed and delayed sets, one job
scheduler with a cron pattern); an exporter process whose one target has a `redis`
section and no `url` is scraped back to back. Every process is started here and
stopped by its PID; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from harness import ExporterProcess, HarnessError, KeepAliveClient, percentile
from producer import MAX_LEN_EVENTS
from prometheus_client.parser import text_string_to_metric_families
from tailing import RedisServerProcess

PREFIX = "bull"
#: What Prometheus sends, its default scrape timeout; also the target's `timeout`.
SCRAPE_TIMEOUT = 10.0
SCRAPE_HEADERS = {"X-Prometheus-Scrape-Timeout-Seconds": f"{SCRAPE_TIMEOUT:g}"}
#: The target: a tenth of the scrape timeout at the median.
P50_TARGET = SCRAPE_TIMEOUT / 10
#: Seconds the exporter has to discover every queue and answer with jobstats_up 1.
DISCOVERY_TIMEOUT = 60.0
#: Jobs of each kind per queue, varied by the queue's index.
WAITING = 3
FINISHED = 5
DELAYED = 2
PATTERN = "*/5 * * * *"


@dataclass(frozen=True, slots=True)
class RedisOnlyPlan:
    queues: int
    scrapes: int
    warmup: int
    #: Seconds the exporter is left alone, to show what it costs between scrapes.
    idle_seconds: float


REDIS_ONLY_FULL = RedisOnlyPlan(1_000, 100, 5, 5.0)
REDIS_ONLY_QUICK = RedisOnlyPlan(20, 3, 1, 0.5)


@dataclass(frozen=True, slots=True)
class RedisOnlyResult:
    queues: int
    keys: int
    exposition_bytes: int
    discovery_seconds: float
    idle_seconds: float
    idle_cpu_seconds: float
    latencies: list[float]
    cpu_seconds: float
    peak_rss: int

    @property
    def scrapes(self) -> int:
        return len(self.latencies)

    @property
    def idle_cpu_fraction(self) -> float:
        return self.idle_cpu_seconds / self.idle_seconds


def queue_names(count: int) -> list[str]:
    return [f"shop-{index:04d}" for index in range(count)]


def write_queues(client: redis.Redis, names: Sequence[str], now_ms: int) -> None:
    """Each queue as BullMQ leaves it: meta, waiting jobs with their hashes, finished and
    delayed jobs, and one job scheduler whose `repeat:<id>` hash has a cron pattern."""
    with client.pipeline(transaction=False) as pipe:
        for index, name in enumerate(names):
            base = f"{PREFIX}:{name}:"
            pipe.hset(
                base + "meta",
                mapping={"opts.maxLenEvents": MAX_LEN_EVENTS, "version": "bullmq:5.0.0"},
            )
            waiting = [str(job) for job in range(1, WAITING + 1 + index % 3)]
            for job in waiting:
                pipe.hset(
                    base + job,
                    mapping={"name": "work", "data": "{}", "timestamp": now_ms - 1000 * int(job)},
                )
            # BullMQ LPUSHes new jobs: the oldest is at the right end.
            pipe.lpush(base + "wait", *waiting)
            first = 100
            for kind, count in (("completed", FINISHED), ("failed", 1 + index % 2)):
                members = {str(first + job): now_ms - 1000 * job for job in range(count)}
                pipe.zadd(base + kind, members)
                first += count
            delayed = {str(200 + job): (now_ms + 60_000) * 0x1000 + job for job in range(DELAYED)}
            pipe.zadd(base + "delayed", delayed)
            scheduler = "every-five-minutes"
            pipe.zadd(base + "repeat", {scheduler: now_ms + 300_000})
            pipe.hset(
                base + f"repeat:{scheduler}",
                mapping={"name": "report", "pattern": PATTERN, "tz": "UTC"},
            )
            if index % 100 == 99:
                pipe.execute()
        pipe.execute()


def exporter_config(server: RedisServerProcess) -> str:
    # No `url`: the target is Redis only. discovery_interval 1s finds the queues soon.
    return (
        "targets:\n"
        "  - name: shop\n"
        f"    timeout: {SCRAPE_TIMEOUT:g}s\n"
        "    redis:\n"
        f"      url: {server.url}\n"
        f"      prefix: {PREFIX}\n"
        "      discovery_interval: 1s\n"
        "log:\n"
        "  level: warn\n"
    )


def _gauges(body: bytes) -> dict[str, float]:
    """The unlabelled samples of an exposition: jobstats_queues, jobstats_up, ..."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for item in family.samples:
            if not item.labels:
                found[item.name] = item.value
    return found


def _wait_discovered(
    exporter: ExporterProcess, scraper: KeepAliveClient, queues: int
) -> tuple[float, bytes]:
    """Until /metrics shows every queue with jobstats_up 1: seconds taken, last answer."""
    started = time.monotonic()
    seen: dict[str, float] = {}
    while time.monotonic() - started < DISCOVERY_TIMEOUT:
        exporter.check_alive()
        body, _ = scraper.get_ok("/metrics", SCRAPE_HEADERS)
        seen = _gauges(body)
        if seen.get("jobstats_queues") == queues and seen.get("jobstats_up") == 1:
            return time.monotonic() - started, body
        time.sleep(0.2)
    raise HarnessError(
        f"/metrics did not show jobstats_queues {queues} and jobstats_up 1 within"
        f" {DISCOVERY_TIMEOUT:g} s: jobstats_queues {seen.get('jobstats_queues')},"
        f" jobstats_up {seen.get('jobstats_up')}\n{exporter.output()}"
    )


def measure_redis_only(server: RedisServerProcess, plan: RedisOnlyPlan) -> RedisOnlyResult:
    names = queue_names(plan.queues)
    server.client.flushall()
    write_queues(server.client, names, int(time.time() * 1000))
    keys = int(server.client.dbsize())
    exporter = ExporterProcess(exporter_config(server))
    scraper = KeepAliveClient(exporter.port, timeout=SCRAPE_TIMEOUT * 2)
    try:
        discovery, body = _wait_discovered(exporter, scraper, plan.queues)
        for _ in range(plan.warmup):
            body, _ = scraper.get_ok("/metrics", SCRAPE_HEADERS)
        idle_before = exporter.cpu_seconds()
        idle_started = time.perf_counter()
        time.sleep(plan.idle_seconds)
        idle_seconds = time.perf_counter() - idle_started
        idle_cpu = exporter.cpu_seconds() - idle_before
        latencies: list[float] = []
        cpu_before = exporter.cpu_seconds()
        for _ in range(plan.scrapes):
            body, elapsed = scraper.get_ok("/metrics", SCRAPE_HEADERS)
            latencies.append(elapsed)
        cpu = exporter.cpu_seconds() - cpu_before
        seen = _gauges(body)
        if seen.get("jobstats_queues") != plan.queues or seen.get("jobstats_up") != 1:
            raise HarnessError(
                f"the last scrape showed jobstats_queues {seen.get('jobstats_queues')},"
                f" jobstats_up {seen.get('jobstats_up')}"
            )
        exporter.check_alive()
        peak = exporter.memory_bytes("VmHWM")
    finally:
        scraper.close()
        exporter.stop()
    return RedisOnlyResult(
        plan.queues, keys, len(body), discovery, idle_seconds, idle_cpu, latencies, cpu, peak
    )


def run_redis_only(plan: RedisOnlyPlan, progress: Callable[[str], None]) -> RedisOnlyResult | str:
    """The measurement, or why the section was skipped."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "skipped: no redis-server on PATH (`make system-deps` installs Debian's)"
    progress(f"redis only: {plan.scrapes} scrapes of {plan.queues:,} queues")
    server = RedisServerProcess(binary)
    try:
        return measure_redis_only(server, plan)
    except redis.RedisError as error:
        raise HarnessError(f"the bench's own Redis commands failed: {error!r}") from error
    finally:
        server.stop()


# --- the report --------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def redis_only_targets(result: RedisOnlyResult) -> list[tuple[str, str, bool]]:
    p50 = percentile(result.latencies, 0.5)
    return [
        (
            f"Redis only, {result.queues:,} queues: scrape p50 < {P50_TARGET:g} s"
            f" (a tenth of the {SCRAPE_TIMEOUT:g} s scrape timeout)",
            f"{_ms(p50)} ms",
            p50 < P50_TARGET,
        )
    ]


def redis_only_table(result: RedisOnlyResult) -> list[str]:
    return [
        "| queues | Redis keys | exposition KiB | found in s | scrapes | p50 ms | p99 ms"
        " | max ms | CPU ms/scrape | CPU between scrapes | peak RSS MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {result.queues:,} | {result.keys:,} | {result.exposition_bytes / 1024:.1f}"
        f" | {result.discovery_seconds:.1f} | {result.scrapes}"
        f" | {_ms(percentile(result.latencies, 0.5))}"
        f" | {_ms(percentile(result.latencies, 0.99))} | {_ms(max(result.latencies))}"
        f" | {_ms(result.cpu_seconds / result.scrapes)} | {result.idle_cpu_fraction:.3f}"
        f" | {result.peak_rss / 1024 / 1024:.1f} |",
    ]


def redis_only_section(result: RedisOnlyResult | str) -> list[str]:
    lines = [
        "## Redis only: the whole card from BullMQ's Redis",
        "",
        "Debian's redis-server on 127.0.0.1 with BullMQ-shaped queues written by redis-py:",
        "each a meta hash (`opts.maxLenEvents`), 3 to 5 waiting jobs with their hashes,",
        "5 completed, 1 or 2 failed and 2 delayed jobs, and one job scheduler (`repeat`",
        f"set, `repeat:<id>` hash with pattern `{PATTERN}`). The exporter's one target has",
        "a `redis` section and no `url` (`timeout: 10s`, `discovery_interval: 1s`); once",
        "/metrics shows every queue and `jobstats_up 1`, it is scraped back to back on one",
        "keep-alive connection, with Prometheus' default 10 s scrape timeout header.",
        "Latency is send to last byte; CPU is the exporter's user + system time over the",
        "scrapes, per scrape; CPU between scrapes is its fraction of one core while left",
        "alone (discovery every second, following the event streams).",
        "",
    ]
    if isinstance(result, str):
        return [*lines, result, ""]
    return [*lines, *redis_only_table(result), ""]
