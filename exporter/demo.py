"""A simulated job stats API for demos and end-to-end tests when no backend exists.

`Simulation` is a seeded, deterministic model of BullMQ queues; time is always passed
in, never read. `make_simulator_server` serves its answers at `GET /api/jobs/stats`.
Nothing here is imported by the exporter proper, and nothing here talks to Redis.
"""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from .schedule import parse_cron

__all__ = ["DEFAULT_QUEUES", "STATS_PATH", "QueueSpec", "Simulation", "make_simulator_server"]

#: The one path the simulator answers, as the real backend does.
STATS_PATH = "/api/jobs/stats"
#: Simulated seconds per step; everything happens on these boundaries.
TICK_SECONDS = 1.0
#: Steps replayed at most when time jumps: a demo left idle for a day answers at once.
MAX_CATCH_UP_TICKS = 600
#: Chance per active queue per tick that a paused or stopped episode starts (about 1 in 20 min).
EPISODE_CHANCE = 1 / 1200
#: Shortest and longest paused/stopped episode, in seconds.
EPISODE_SECONDS = (20.0, 150.0)
#: How long a job stays active, in seconds.
WORK_SECONDS = (0.5, 4.0)
#: How far ahead an ad-hoc delayed job is due, in seconds.
DELAY_SECONDS = (10.0, 90.0)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One simulated queue: its scheduler's cron (BullMQ syntax) and its traffic."""

    name: str
    cron: str | None = None
    #: Chance of one new job per tick (at most one arrives per tick).
    arrival_chance: float = 0.1
    failure_ratio: float = 0.08
    #: Share of new jobs added with a delay instead of straight to waiting.
    delayed_ratio: float = 0.1
    concurrency: int = 2
    #: BullMQ `removeOnComplete` / `removeOnFail` as `{count, age}`.
    keep_completed: int = 100
    keep_failed: int = 50
    keep_age_seconds: float = 600.0


DEFAULT_QUEUES = (
    QueueSpec("inventory", cron="*/6 * * * *", arrival_chance=0.08),
    # Seconds come first in BullMQ's 6-field patterns: every 3 minutes.
    QueueSpec("product", cron="0 */3 * * * *", arrival_chance=0.05, failure_ratio=0.12),
    # Every 30 s, so a demo shows nextRun moving.
    QueueSpec("emails", cron="*/30 * * * * *", arrival_chance=0.15, failure_ratio=0.05),
)

_REDIS_UP_MESSAGE = "Background jobs are enabled with Redis"
_REDIS_DOWN_MESSAGE = "Background jobs are disabled (Redis not available)"


@dataclass(slots=True)
class _QueueState:
    spec: QueueSpec
    #: The cron pattern in words, kept so that each next fire time skips describing it again.
    cron_words: str
    #: The scheduler's next run (Unix seconds); None without a scheduler.
    next_run: float | None
    status: str = "active"
    status_until: float = 0.0
    waiting: int = 0
    #: Finish times of the jobs being worked on.
    running: list[float] = field(default_factory=list)
    #: Due times of delayed jobs other than the scheduler's own.
    delayed_until: list[float] = field(default_factory=list)
    #: Finish times of retained jobs, oldest first.
    completed: deque[float] = field(default_factory=deque)
    failed: deque[float] = field(default_factory=deque)


class Simulation:
    """Queues that receive, run, fail, delay and schedule jobs, one tick at a time.

    The same seed, start and queues give the same answers at the same times,
    however the times are stepped through (within `MAX_CATCH_UP_TICKS`).
    """

    def __init__(
        self, seed: int = 0, *, start: float, queues: Sequence[QueueSpec] | None = None
    ) -> None:
        specs = tuple(DEFAULT_QUEUES if queues is None else queues)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names) or "redisStatus" in names:
            raise ValueError(f"queue names must be unique and not redisStatus: {names}")
        self._random = random.Random(seed)
        self._start = start
        self._ticks = 0
        #: When true, `answer()` reports Redis as unreachable, as the real backend does.
        self.redis_down = False
        self._queues = [self._initial_state(spec, start) for spec in specs]

    @property
    def now(self) -> float:
        """The simulated time reached so far (Unix seconds)."""
        return self._start + self._ticks * TICK_SECONDS

    def advance(self, now: float) -> None:
        """Step forward to `now`; a time already passed changes nothing."""
        target = int((now - self._start) // TICK_SECONDS)
        if target <= self._ticks:
            return
        # Skipped ticks are lost, not replayed: overdue schedules fire once, as in BullMQ.
        self._ticks = max(self._ticks, target - MAX_CATCH_UP_TICKS)
        while self._ticks < target:
            self._ticks += 1
            self._tick(self.now)

    def answer(self, now: float) -> dict[str, Any]:
        """The stats API's JSON document at `now`, after advancing to it."""
        self.advance(now)
        if self.redis_down:
            return {
                "success": True,
                "stats": {"redisStatus": "disabled"},
                "redisAvailable": False,
                "message": _REDIS_DOWN_MESSAGE,
            }
        stats: dict[str, Any] = {queue.spec.name: _queue_document(queue) for queue in self._queues}
        stats["redisStatus"] = "enabled"
        return {
            "success": True,
            "stats": stats,
            "redisAvailable": True,
            "message": _REDIS_UP_MESSAGE,
        }

    def _initial_state(self, spec: QueueSpec, start: float) -> _QueueState:
        if spec.cron is None:
            return _QueueState(spec, "", None)
        schedule = parse_cron(spec.cron, start, UTC)
        if schedule is None:
            raise ValueError(f"queue {spec.name}: invalid cron pattern {spec.cron!r}")
        return _QueueState(spec, schedule.words, schedule.next_fire_time)

    def _tick(self, now: float) -> None:
        for queue in self._queues:
            self._update_status(queue, now)
        for queue in self._queues:
            self._step(queue, now)

    def _update_status(self, queue: _QueueState, now: float) -> None:
        if queue.status != "active":
            if now >= queue.status_until:
                queue.status = "active"
            return
        # One troubled queue at a time keeps the demo mostly healthy.
        if any(other.status != "active" for other in self._queues):
            return
        if self._random.random() >= EPISODE_CHANCE:
            return
        queue.status = self._random.choice(("paused", "stopped"))
        queue.status_until = now + self._random.uniform(*EPISODE_SECONDS)
        if queue.status == "stopped":
            # The worker is gone; its jobs stall and go back to waiting.
            queue.waiting += len(queue.running)
            queue.running.clear()

    def _step(self, queue: _QueueState, now: float) -> None:
        spec, rng = queue.spec, self._random
        # Producers keep adding jobs whatever the queue's status.
        if rng.random() < spec.arrival_chance:
            if rng.random() < spec.delayed_ratio:
                queue.delayed_until.append(now + rng.uniform(*DELAY_SECONDS))
            else:
                queue.waiting += 1
        if queue.status == "stopped":
            # BullMQ's workers promote delayed jobs and schedule the next run: none runs.
            return
        due = [when for when in queue.delayed_until if when <= now]
        queue.delayed_until = [when for when in queue.delayed_until if when > now]
        queue.waiting += len(due)
        if queue.next_run is not None and now >= queue.next_run:
            queue.waiting += 1
            queue.next_run = self._next_fire_time(queue, now)
        still_running = []
        for finish in queue.running:
            if finish > now:
                still_running.append(finish)
            elif rng.random() < spec.failure_ratio:
                _retain(queue.failed, now, spec.keep_failed, spec.keep_age_seconds)
            else:
                _retain(queue.completed, now, spec.keep_completed, spec.keep_age_seconds)
        queue.running = still_running
        # A paused queue lets running jobs finish but starts none.
        while queue.status == "active" and queue.waiting and len(queue.running) < spec.concurrency:
            queue.waiting -= 1
            queue.running.append(now + rng.uniform(*WORK_SECONDS))

    def _next_fire_time(self, queue: _QueueState, now: float) -> float | None:
        assert queue.spec.cron is not None  # only queues with a next run get here
        schedule = parse_cron(queue.spec.cron, now, UTC, queue.cron_words)
        return None if schedule is None else schedule.next_fire_time


def _retain(finished: deque[float], now: float, keep: int, keep_age: float) -> None:
    """Record a finished job, then trim as BullMQ does on each finish: by age, then by count."""
    finished.append(now)
    while finished and finished[0] <= now - keep_age:
        finished.popleft()
    while len(finished) > keep:
        finished.popleft()


def _queue_document(queue: _QueueState) -> dict[str, Any]:
    has_scheduler = queue.next_run is not None
    return {
        "waiting": queue.waiting,
        "active": len(queue.running),
        "completed": len(queue.completed),
        "failed": len(queue.failed),
        # The scheduler's next run is itself a delayed job.
        "delayed": len(queue.delayed_until) + (1 if has_scheduler else 0),
        "status": queue.status,
        "recurringJobs": {
            "count": 1 if has_scheduler else 0,
            "nextRun": round(queue.next_run * 1000) if queue.next_run is not None else None,
            "cron": queue.spec.cron if has_scheduler else None,
        },
    }


def make_simulator_server(
    address: tuple[str, int],
    simulation: Simulation,
    clock: Callable[[], float] = time.time,
) -> http.server.ThreadingHTTPServer:
    """An HTTP server answering `GET /api/jobs/stats` from `simulation`; not yet serving.

    The caller runs `serve_forever()` (in a thread) and later `shutdown()` and `server_close()`.
    """
    lock = threading.Lock()

    class StatsHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Buffer the response so headers and body leave in one send: two sends on a
        # keep-alive connection meet Nagle and delayed ACK and stall about 40 ms.
        wbufsize = -1
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            if urlsplit(self.path).path != STATS_PATH:
                self._reply(404, b'{"success": false, "error": "not found"}\n')
                return
            with lock:
                document = simulation.answer(clock())
            self._reply(200, json.dumps(document).encode())

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class name
            """Stay quiet: a scrape every few seconds would flood stderr."""

    server = http.server.ThreadingHTTPServer(address, StatsHandler)
    server.daemon_threads = True
    return server
