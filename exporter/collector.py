"""Turn one upstream answer into metric families, fresh on every scrape.

The only I/O is one `client.fetch()` per scrape. The exporter's own errors
(`FetchError`, `ParseError`) become `jobstats_up 0` plus a counted reason and
one log line; anything else is a bug and is left to surface. The families are
built once per scrape and either handed to prometheus_client (`collect()`,
OpenMetrics) or written straight as text (`render_text()`), byte for byte
what prometheus_client writes but without its per-sample cost.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .client import StatsClient
from .errors import FetchError, ParseError
from .model import KNOWN_STATUSES, Limits, Stats, parse_stats
from .schedule import CronSchedules

__all__ = [
    "SCRAPE_ERROR_REASONS",
    "Family",
    "JobStatsCollector",
    "ScrapeErrors",
    "render_chunks",
    "render_text",
]

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


@dataclass(slots=True)
class Family:
    """One metric family of a scrape: what prometheus_client would hold, kept lean."""

    name: str  # as prometheus_client names it: no `_total` on a counter, no `_info` on info
    help: str
    kind: str  # gauge, counter or info
    labels: tuple[str, ...] = ()
    rows: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, values: tuple[str, ...], value: float) -> None:
        self.rows.append((values, value))

    def metric(self) -> Metric:
        """The same family as a prometheus_client Metric, for its encoders."""
        if self.kind == "info":
            ((values, _),) = self.rows
            return InfoMetricFamily(
                self.name, self.help, value=dict(zip(self.labels, values, strict=True))
            )
        family: Metric
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        else:
            family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for values, value in self.rows:
            family.add_metric(list(values), value)
        return family


class JobStatsCollector(Collector):
    """Collects one scrape: fetch with `timeout`, parse, build the families."""

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
        for family in self.families():
            yield family.metric()

    def families(self) -> list[Family]:
        """Scrape the upstream once and build every family of this scrape, in order."""
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

        families = [
            _single(
                "jobstats_up",
                "1 when this scrape's fetch and parse of the stats API succeeded, else 0.",
                0 if stats is None else 1,
            ),
            _single(
                "jobstats_scrape_duration_seconds",
                "Time spent on the upstream call and parse, this scrape.",
                duration,
            ),
        ]
        errors = Family(
            "jobstats_scrape_errors",
            "Failed scrapes of the stats API since start, by reason.",
            "counter",
            ("reason",),
        )
        for reason, count in self.errors.snapshot().items():
            errors.add((reason,), count)
        families.append(errors)
        if stats is not None:
            families.append(
                _single(
                    "jobstats_result_age_seconds",
                    "Age of the upstream answer this scrape shows: 0 unless min_interval reuses"
                    " one.",
                    age,
                )
            )
            families.extend(self._stats_families(stats))
        families.append(
            Family(
                "jobstats_exporter_build",
                "The exporter's version and Python version.",
                "info",
                ("version", "python_version"),
                [((__version__, platform.python_version()), 1)],
            )
        )
        return families

    def _stats_families(self, stats: Stats) -> list[Family]:
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
        dropped = Family(
            "jobstats_dropped_queues",
            "Queues left out this scrape by a limit (max_queues, max_queue_name_length).",
            "gauge",
            ("limit",),
        )
        dropped.add(("max_queues",), stats.dropped_queues)
        dropped.add(("max_queue_name_length",), stats.dropped_long_names)
        families = [
            dropped,
            _single(
                "jobstats_dropped_states",
                "Extra states left out this scrape by max_extra_states or the name length limit.",
                stats.dropped_states,
            ),
        ]
        if stats.redis_available is not None:
            families.append(
                _single(
                    "jobstats_redis_available",
                    "1 when the backend reaches Redis (redisAvailable), else 0.",
                    int(stats.redis_available),
                )
            )
        families += [
            _single(
                "jobstats_redis_enabled",
                "1 when stats.redisStatus is 'enabled', else 0.",
                int(stats.redis_enabled),
            ),
            _single("jobstats_queues", "Number of queues exported this scrape.", len(stats.queues)),
            _single(
                "jobstats_invalid_queues",
                "Queues skipped this scrape because their entry was malformed.",
                len(stats.invalid),
            ),
        ]

        jobs = Family(
            "jobstats_queue_jobs", "Jobs in the queue by state.", "gauge", ("queue", "state")
        )
        status = Family(
            "jobstats_queue_status",
            "The queue's status, one-hot over active, paused, stopped and unknown.",
            "gauge",
            ("queue", "status"),
        )
        recurring = Family(
            "jobstats_queue_recurring_jobs",
            "Number of job schedulers (recurringJobs.count).",
            "gauge",
            ("queue",),
        )
        next_run = Family(
            "jobstats_queue_next_run_timestamp_seconds",
            "Soonest scheduled run as reported by the API (recurringJobs.nextRun).",
            "gauge",
            ("queue",),
        )
        cron_next = Family(
            "jobstats_queue_cron_next_run_timestamp_seconds",
            "Next fire time of recurringJobs.cron, computed by the exporter.",
            "gauge",
            ("queue",),
        )
        cron_interval = Family(
            "jobstats_queue_cron_interval_seconds",
            "Seconds between the next two fires of recurringJobs.cron.",
            "gauge",
            ("queue",),
        )
        info = Family(
            "jobstats_queue_recurring_info",
            "The queue's cron pattern and the pattern in words; always 1.",
            "gauge",
            ("queue", "cron", "schedule"),
        )
        now = self.clock()
        # Bound once: these run for every sample of every queue.
        add_job, add_status = jobs.rows.append, status.rows.append
        for queue in stats.queues:
            name = queue.name
            for state, count in queue.states():
                add_job(((name, state), count))
            for candidate in STATUSES:
                add_status(((name, candidate), 1 if candidate == queue.status else 0))
            if queue.recurring is None:
                continue
            recurring.add((name,), queue.recurring.count)
            if queue.recurring.next_run_ms is not None:
                next_run.add((name,), queue.recurring.next_run_ms / 1000)
            pattern = queue.recurring.cron
            if pattern is None:
                continue
            schedule = self.schedules.at(pattern, now)
            if schedule is None:
                info.add((name, pattern, INVALID_SCHEDULE), 1)
                continue
            info.add((name, pattern, schedule.words), 1)
            cron_next.add((name,), schedule.next_fire_time)
            cron_interval.add((name,), schedule.interval_seconds)
        return [*families, jobs, status, recurring, next_run, cron_next, cron_interval, info]


def render_text(families: list[Family]) -> str:
    """The families in the Prometheus text format 0.0.4, as generate_latest writes them."""
    return "".join(_rendered(families))


def render_chunks(families: list[Family]) -> list[bytes]:
    """The same text, encoded one family at a time.

    Only one family's lines exist as strings at once: a large scrape's peak memory is
    the encoded answer and one family, not every line, their join and its encoding.
    """
    return [chunk.encode() for chunk in _rendered(families)]


def _rendered(families: list[Family]) -> Iterator[str]:
    """Each family as text. Label values are escaped once per distinct value, not once
    per sample: a queue's name appears in about fifteen samples.
    """
    escaped: dict[str, str] = {}

    def escape(raw: str) -> str:
        text = escaped.get(raw)
        if text is None:
            text = escaped[raw] = raw.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        return text

    for family in families:
        lines: list[str] = []
        name = family.name
        if family.kind == "counter":
            name += "_total"
        elif family.kind == "info":
            name += "_info"
        help_text = family.help.replace("\\", r"\\").replace("\n", r"\n")
        kind = "counter" if family.kind == "counter" else "gauge"
        lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        keys = family.labels
        if not keys:
            lines.extend(f"{name} {_number(value)}\n" for _, value in family.rows)
            yield "".join(lines)
            continue
        # One template per family, labels sorted by name as prometheus_client writes them:
        # each sample then costs one format call.
        count = len(keys)
        pairs = ",".join(f'{keys[i]}="{{{i}}}"' for i in sorted(range(count), key=keys.__getitem__))
        template = f"{name}{{{{{pairs}}}}} {{{count}}}\n"
        for values, value in family.rows:
            lines.append(template.format(*map(escape, values), _number(value)))
        yield "".join(lines)


def _number(value: float) -> str:
    # floatToGoString's result for a small whole number, without its float round trip.
    if type(value) is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _single(name: str, help_text: str, value: float) -> Family:
    return Family(name, help_text, "gauge", (), [((), value)])
