"""Turn one upstream answer into metric families, fresh on every scrape.

The only I/O is one `client.fetch()` per scrape (and the Redis source's view),
awaited on the server's loop. The exporter's own errors (`FetchError`,
`ParseError`) become `jobstats_up 0` plus a counted reason and one log line;
anything else is a bug and is left to surface. The families are built once
per scrape and either handed to prometheus_client (`openmetrics()`) or
written straight as text (`render_text()`), byte for byte
what prometheus_client writes but without its per-sample cost.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from array import array
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .client import StatsClient
from .errors import FetchError, ParseError
from .exposition import Family, Histogram, render_chunks, render_text, sample_writers, single
from .model import KNOWN_STATUSES, Limits, ParseMemo, QueueStats, Stats, parse_stats
from .schedule import CronSchedules, Schedule

if TYPE_CHECKING:
    # Only a target with a Redis source loads the tailer's module.
    from .events import RedisView

__all__ = [
    "SCRAPE_ERROR_REASONS",
    "AnswerMemo",
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

    def count(self, reason: str) -> None:
        self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self._counts)


class JobStatsCollector:
    """Collects one scrape: fetch with `timeout`, parse, build the families."""

    def __init__(
        self,
        client: StatsClient | None,
        timeout: float,
        schedules: CronSchedules,
        errors: ScrapeErrors,
        limits: Limits = Limits(),  # noqa: B008 - frozen, so one shared default is safe
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.perf_counter,
        redis_view: Callable[[float], Coroutine[Any, Any, RedisView]] | None = None,
        memo: AnswerMemo | None = None,
    ) -> None:
        self.client = client
        #: Starts this scrape's read of the target's Redis source; None without one.
        self.redis_view = redis_view
        #: The target's last answer, parsed and rendered; None to build everything afresh
        #: (and as rows: what OpenMetrics needs).
        self.memo = memo
        self.timeout = timeout
        self.schedules = schedules
        self.errors = errors
        self.limits = limits
        self.clock = clock
        self.timer = timer

    async def families(self) -> list[Family | Histogram]:
        """Scrape the upstream once and build every family of this scrape, in order."""
        started = self.timer()
        age = 0.0
        # Started first, so the Redis reads run while the API answers.
        view = (
            asyncio.ensure_future(self.redis_view(self.timeout))
            if self.redis_view is not None
            else None
        )
        redis: RedisView | None = None
        try:
            if self.client is not None:
                fetched = await self.client.fetch(self.timeout)
                age = fetched.age
                stats: Stats | None = parse_stats(
                    fetched.body, self.limits, self.memo.parse if self.memo else None
                )
                del fetched  # the body is parsed: not kept through the rendering
            else:
                # No stats API: the card comes from the Redis source, read under the deadline.
                assert view is not None, "a target without a stats API has a Redis source"
                redis = await view
                if redis.card_error is not None:
                    raise redis.card_error
                stats = redis.card
        except (FetchError, ParseError) as error:
            self.errors.count(error.reason)
            log.warning("scrape failed", extra={"reason": error.reason, "err": str(error)})
            stats = None
        duration = self.timer() - started

        families: list[Family | Histogram] = [
            single(
                "jobstats_up",
                "1 when this scrape's fetch and parse of the stats API succeeded, else 0.",
                0 if stats is None else 1,
            ),
            single(
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
                single(
                    "jobstats_result_age_seconds",
                    "Age of the upstream answer this scrape shows: 0 unless min_interval reuses"
                    " one.",
                    age,
                )
            )
            families.extend(self._stats_families(stats))
        if view is not None:
            # The view keeps to the same deadline as the fetch.
            families.extend(redis_families(redis or await view))
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
            single(
                "jobstats_dropped_states",
                "Extra states left out this scrape by max_extra_states or the name length limit.",
                stats.dropped_states,
            ),
        ]
        if stats.redis_available is not None:
            families.append(
                single(
                    "jobstats_redis_available",
                    "1 when the backend reaches Redis (redisAvailable), else 0.",
                    int(stats.redis_available),
                )
            )
        families += [
            single(
                "jobstats_redis_enabled",
                "1 when stats.redisStatus is 'enabled', else 0.",
                int(stats.redis_enabled),
            ),
            single("jobstats_queues", "Number of queues exported this scrape.", len(stats.queues)),
            single(
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
        per_queue = (jobs, status, recurring, next_run, cron_next, cron_interval, info)
        now = self.clock()
        memo = self.memo
        schedules = [self._schedule(queue, now) for queue in stats.queues]
        if memo is None:
            for family, rows_of in zip(per_queue, QUEUE_ROWS, strict=True):
                for queue, schedule in zip(stats.queues, schedules, strict=True):
                    family.rows.extend(rows_of(queue, schedule))
            return [*families, *per_queue]
        memo.reuse(stats.queues, schedules, per_queue)
        return [*families, *per_queue]

    def _schedule(self, queue: QueueStats, now: float) -> Schedule | None:
        pattern = queue.recurring.cron if queue.recurring is not None else None
        return self.schedules.at(pattern, now) if pattern is not None else None


Rows = list[tuple[tuple[str, ...], float]]


def _jobs(queue: QueueStats, schedule: Schedule | None) -> Rows:
    return [((queue.name, state), count) for state, count in queue.states()]


def _status(queue: QueueStats, schedule: Schedule | None) -> Rows:
    return [((queue.name, each), 1 if each == queue.status else 0) for each in STATUSES]


def _recurring(queue: QueueStats, schedule: Schedule | None) -> Rows:
    scheduled = queue.recurring
    return [] if scheduled is None else [((queue.name,), scheduled.count)]


def _next_run(queue: QueueStats, schedule: Schedule | None) -> Rows:
    scheduled = queue.recurring
    if scheduled is None or scheduled.next_run_ms is None:
        return []
    return [((queue.name,), scheduled.next_run_ms / 1000)]


def _cron_next(queue: QueueStats, schedule: Schedule | None) -> Rows:
    return [] if schedule is None else [((queue.name,), schedule.next_fire_time)]


def _cron_interval(queue: QueueStats, schedule: Schedule | None) -> Rows:
    return [] if schedule is None else [((queue.name,), schedule.interval_seconds)]


def _recurring_info(queue: QueueStats, schedule: Schedule | None) -> Rows:
    pattern = queue.recurring.cron if queue.recurring is not None else None
    if pattern is None:
        return []
    words = INVALID_SCHEDULE if schedule is None else schedule.words
    return [((queue.name, pattern, words), 1)]


#: One queue's samples in each per-queue family: jobs, status, recurring jobs, next run,
#: cron next run, cron interval and recurring info, in that order.
QUEUE_ROWS = (_jobs, _status, _recurring, _next_run, _cron_next, _cron_interval, _recurring_info)


class AnswerMemo:
    """What one target's last scrape parsed and rendered, for the next to reuse.

    The sample lines of each per-queue family are kept as one bytes (what the answer
    writes), with where each queue's lines start. A queue whose stats are equal and
    whose schedule is the same object keeps its lines: unchanged runs of queues are
    copied over as slices, only changed queues are rendered, and an answer where no
    queue changed is written from the kept bytes as they are.
    """

    def __init__(self) -> None:
        self.parse = ParseMemo()
        #: By queue name, in the last answer's order: its stats, schedule and position.
        self.queues: dict[str, tuple[QueueStats, Schedule | None, int]] = {}
        #: Per per-queue family: every queue's lines, joined; and each queue's start
        #: offset in them, plus the end.
        self.texts: list[bytes | bytearray] = []
        self.starts: list[array[int]] = []

    def reuse(
        self,
        queues: Sequence[QueueStats],
        schedules: Sequence[Schedule | None],
        families: Sequence[Family],
    ) -> None:
        """Give each of `families` (the per-queue ones, in _queue_rows' order) its lines
        for `queues`, reusing what did not change; keep them for the next scrape."""
        known = self.queues
        # Runs of unchanged queues ([first, end) of their old positions), and each changed
        # queue with its schedule, in the new order.
        steps: list[list[int] | tuple[QueueStats, Schedule | None]] = []
        kept: dict[str, tuple[QueueStats, Schedule | None, int]] = {}
        for position, (queue, schedule) in enumerate(zip(queues, schedules, strict=True)):
            last = known.get(queue.name)
            if last is not None and last[1] is schedule and last[0] == queue:
                old = last[2]
                run = steps[-1] if steps else None
                if isinstance(run, list) and run[1] == old:
                    run[1] = old + 1
                else:
                    steps.append([old, old + 1])
            else:
                steps.append((queue, schedule))
            kept[queue.name] = (queue, schedule, position)
        unchanged = steps == [[0, len(known)]] and len(self.texts) == len(families)
        if not unchanged:
            self._rebuild(steps, families)
        self.queues = kept
        for family, text in zip(families, self.texts, strict=True):
            family.text = text

    def _rebuild(
        self,
        steps: list[list[int] | tuple[QueueStats, Schedule | None]],
        families: Sequence[Family],
    ) -> None:
        # A family at a time, into one growing buffer: apart from the kept texts, only
        # one family's new text exists, never its pieces and their join as well.
        texts: list[bytes | bytearray] = []
        starts_of: list[array[int]] = []
        writers = sample_writers(families)
        for index, (writer, rows_of) in enumerate(zip(writers, QUEUE_ROWS, strict=True)):
            old = memoryview(self.texts[index]) if self.texts else memoryview(b"")
            old_starts = self.starts[index] if self.starts else array("q", [0])
            text = bytearray()
            starts = array("q", [0])
            for step in steps:
                if isinstance(step, list):
                    first, end = step
                    text += old[old_starts[first] : old_starts[end]]
                    shift = starts[-1] - old_starts[first]
                    starts.extend(old_starts[k] + shift for k in range(first + 1, end + 1))
                else:
                    text += writer.lines(rows_of(*step))
                    starts.append(len(text))
            texts.append(text)
            starts_of.append(starts)
        self.texts, self.starts = texts, starts_of


def redis_families(view: RedisView) -> list[Family | Histogram]:
    """The families of a Redis source: exact counters and timings from the event streams."""
    from .events import BUCKETS

    families: list[Family | Histogram] = [
        single(
            "jobstats_redis_up",
            "1 when the exporter's own connection to the BullMQ Redis worked on its last"
            " attempt, else 0.",
            int(view.up),
        )
    ]
    completed = Family(
        "jobstats_queue_jobs_completed",
        "Jobs completed (BullMQ completed events) since the exporter started.",
        "counter",
        ("queue",),
    )
    failed = Family(
        "jobstats_queue_jobs_failed",
        "Jobs failed for good (BullMQ failed events) since the exporter started.",
        "counter",
        ("queue",),
    )
    retries = Family(
        "jobstats_queue_job_retries",
        "Jobs moved back from active to wait or delayed: failed attempts to be retried,"
        " stalled jobs recovered.",
        "counter",
        ("queue",),
    )
    missed = Family(
        "jobstats_queue_events_missed",
        "Event stream entries trimmed before the exporter read them.",
        "counter",
        ("queue",),
    )
    wait = Histogram(
        "jobstats_queue_job_wait_seconds",
        "Time from a job becoming ready (waiting) to active.",
        BUCKETS,
        ("queue",),
    )
    run = Histogram(
        "jobstats_queue_job_run_seconds",
        "Time from active to the end of that attempt; outcome failed includes retried attempts.",
        BUCKETS,
        ("queue", "outcome"),
    )
    for queue, counts in sorted(view.counts.items()):
        completed.add((queue,), counts.completed)
        failed.add((queue,), counts.failed)
        retries.add((queue,), counts.retries)
        missed.add((queue,), counts.missed)
        wait.add((queue,), counts.wait.cumulative(), counts.wait.total)
        run.add((queue, "completed"), counts.run_completed.cumulative(), counts.run_completed.total)
        run.add((queue, "failed"), counts.run_failed.cumulative(), counts.run_failed.total)
    families += [completed, failed, retries, missed, wait, run]
    if view.oldest_waiting is not None:
        oldest = Family(
            "jobstats_queue_oldest_waiting_job_age_seconds",
            "Age of the job that has waited longest (wait list and prioritized); 0 when none"
            " waits.",
            "gauge",
            ("queue",),
        )
        for queue, age in sorted(view.oldest_waiting.items()):
            oldest.add((queue,), age)
        families.append(oldest)
    if view.workers is not None:
        workers = Family(
            "jobstats_queue_workers",
            "BullMQ workers connected for the queue (named connections in CLIENT LIST).",
            "gauge",
            ("queue",),
        )
        for queue, count in sorted(view.workers.items()):
            workers.add((queue,), count)
        families.append(workers)
    families.append(
        Family(
            "jobstats_job_timings_dropped",
            "Jobs left untimed because the exporter's map of pending jobs was full.",
            "counter",
            (),
            [((), view.timings_dropped)],
        )
    )
    return families
