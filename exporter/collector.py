"""Turn one upstream answer into metric families, fresh on every scrape.

The only I/O is one `client.fetch()` per scrape. The exporter's own errors
(`FetchError`, `ParseError`) become `jobstats_up 0` plus a counted reason and
one log line; anything else is a bug and is left to surface.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import __version__
from .client import StatsClient
from .errors import FetchError, ParseError
from .model import KNOWN_STATUSES, Limits, Stats, parse_stats
from .schedule import CronSchedules

__all__ = ["SCRAPE_ERROR_REASONS", "JobStatsCollector", "ScrapeErrors"]

#: Every reason a scrape can fail for; each is exported from the start, at 0.
SCRAPE_ERROR_REASONS = (
    "timeout",
    "connect",
    "http_status",
    "invalid_json",
    "invalid_payload",
    "api_failure",
    "too_large",
)
STATUSES = (*KNOWN_STATUSES, "unknown")
#: Malformed queues logged one by one per scrape; the rest in one line.
MAX_LOGGED_INVALID = 10
#: `schedule` label of a pattern that BullMQ could not run.
INVALID_SCHEDULE = "invalid cron pattern"

log = logging.getLogger("jobstats_exporter")


class ScrapeErrors:
    """Failed scrapes by reason since start: the one state kept between scrapes."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(SCRAPE_ERROR_REASONS, 0)
        self._lock = threading.Lock()

    def count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class JobStatsCollector(Collector):
    """Collects one scrape: fetch with `timeout`, parse, yield the families."""

    def __init__(
        self,
        client: StatsClient,
        timeout: float,
        schedules: CronSchedules,
        errors: ScrapeErrors,
        limits: Limits = Limits(),  # noqa: B008 - frozen, so one shared default is safe
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.schedules = schedules
        self.errors = errors
        self.limits = limits
        self.clock = clock
        self.timer = timer

    def collect(self) -> Iterator[Metric]:
        started = self.timer()
        age = 0.0
        try:
            fetched = self.client.fetch(self.timeout)
            age = fetched.age
            stats: Stats | None = parse_stats(fetched.body, self.limits)
        except (FetchError, ParseError) as error:
            self.errors.count(error.reason)
            log.warning("scrape failed", extra={"reason": error.reason, "err": str(error)})
            stats = None
        duration = self.timer() - started

        yield GaugeMetricFamily(
            "jobstats_up",
            "1 when this scrape's fetch and parse of the stats API succeeded, else 0.",
            value=0 if stats is None else 1,
        )
        yield GaugeMetricFamily(
            "jobstats_scrape_duration_seconds",
            "Time spent on the upstream call and parse, this scrape.",
            value=duration,
        )
        errors = CounterMetricFamily(
            "jobstats_scrape_errors",
            "Failed scrapes of the stats API since start, by reason.",
            labels=["reason"],
        )
        for reason, count in self.errors.snapshot().items():
            errors.add_metric([reason], count)
        yield errors
        if stats is not None:
            yield GaugeMetricFamily(
                "jobstats_result_age_seconds",
                "Age of the upstream answer this scrape shows: 0 unless min_interval reuses one.",
                value=age,
            )
            yield from self._stats_families(stats)
        yield InfoMetricFamily(
            "jobstats_exporter_build",
            "The exporter's version and Python version.",
            value={"version": __version__, "python_version": platform.python_version()},
        )

    def _stats_families(self, stats: Stats) -> Iterator[Metric]:
        for error in stats.invalid[:MAX_LOGGED_INVALID]:
            log.warning("queue skipped", extra={"reason": error.reason, "err": str(error)})
        if len(stats.invalid) > MAX_LOGGED_INVALID:
            log.warning(
                "more queues skipped",
                extra={
                    "reason": "invalid_payload",
                    "count": len(stats.invalid) - MAX_LOGGED_INVALID,
                },
            )
        dropped = GaugeMetricFamily(
            "jobstats_dropped_queues",
            "Queues left out this scrape by a limit (max_queues, max_queue_name_length).",
            labels=["limit"],
        )
        dropped.add_metric(["max_queues"], stats.dropped_queues)
        dropped.add_metric(["max_queue_name_length"], stats.dropped_long_names)
        yield dropped
        yield GaugeMetricFamily(
            "jobstats_dropped_states",
            "Extra states left out this scrape by max_extra_states or the name length limit.",
            value=stats.dropped_states,
        )
        if stats.redis_available is not None:
            yield GaugeMetricFamily(
                "jobstats_redis_available",
                "1 when the backend reaches Redis (redisAvailable), else 0.",
                value=int(stats.redis_available),
            )
        yield GaugeMetricFamily(
            "jobstats_redis_enabled",
            "1 when stats.redisStatus is 'enabled', else 0.",
            value=int(stats.redis_enabled),
        )
        yield GaugeMetricFamily(
            "jobstats_queues", "Number of queues exported this scrape.", value=len(stats.queues)
        )
        yield GaugeMetricFamily(
            "jobstats_invalid_queues",
            "Queues skipped this scrape because their entry was malformed.",
            value=len(stats.invalid),
        )

        jobs = GaugeMetricFamily(
            "jobstats_queue_jobs", "Jobs in the queue by state.", labels=["queue", "state"]
        )
        status = GaugeMetricFamily(
            "jobstats_queue_status",
            "The queue's status, one-hot over active, paused, stopped and unknown.",
            labels=["queue", "status"],
        )
        recurring = GaugeMetricFamily(
            "jobstats_queue_recurring_jobs",
            "Number of job schedulers (recurringJobs.count).",
            labels=["queue"],
        )
        next_run = GaugeMetricFamily(
            "jobstats_queue_next_run_timestamp_seconds",
            "Soonest scheduled run as reported by the API (recurringJobs.nextRun).",
            labels=["queue"],
        )
        cron_next = GaugeMetricFamily(
            "jobstats_queue_cron_next_run_timestamp_seconds",
            "Next fire time of recurringJobs.cron, computed by the exporter.",
            labels=["queue"],
        )
        cron_interval = GaugeMetricFamily(
            "jobstats_queue_cron_interval_seconds",
            "Seconds between the next two fires of recurringJobs.cron.",
            labels=["queue"],
        )
        info = GaugeMetricFamily(
            "jobstats_queue_recurring_info",
            "The queue's cron pattern and the pattern in words; always 1.",
            labels=["queue", "cron", "schedule"],
        )
        now = self.clock()
        for queue in stats.queues:
            name = queue.name
            for state, count in queue.states():
                jobs.add_metric([name, state], count)
            for candidate in STATUSES:
                status.add_metric([name, candidate], 1 if candidate == queue.status else 0)
            if queue.recurring is None:
                continue
            recurring.add_metric([name], queue.recurring.count)
            if queue.recurring.next_run_ms is not None:
                next_run.add_metric([name], queue.recurring.next_run_ms / 1000)
            pattern = queue.recurring.cron
            if pattern is None:
                continue
            schedule = self.schedules.at(pattern, now)
            if schedule is None:
                info.add_metric([name, pattern, INVALID_SCHEDULE], 1)
                continue
            info.add_metric([name, pattern, schedule.words], 1)
            cron_next.add_metric([name], schedule.next_fire_time)
            cron_interval.add_metric([name], schedule.interval_seconds)
        yield from (jobs, status, recurring, next_run, cron_next, cron_interval, info)
