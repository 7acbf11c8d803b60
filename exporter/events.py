"""Exact job counters and timings from BullMQ's per-queue event streams.

`EventCounts` turns stream entries into counters and histograms and does no
I/O. `Tailer` reads every queue's stream with blocking reads from where it
stood at start, keeps its place across reconnects, and counts the entries a
trim took before it read them; it never writes to Redis. Scrapes read a
`snapshot()` from memory: they never wait on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import bullmq
from .errors import FetchError
from .model import Stats
from .targets import RedisSource

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BUCKETS",
    "EventCounts",
    "QueueCounts",
    "RedisView",
    "Tailer",
    "Timings",
]

#: Histogram upper bounds in seconds: jobs of a few milliseconds to an hour.
BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Jobs waiting or running whose start is kept to time them, over every queue.
MAX_PENDING_JOBS = 50_000
#: Milliseconds after which a pending job may make room for a new one when the map is
#: full: past the largest bucket, its time would only say "over an hour".
STALE_MS = 3_600_000
#: Entries read per stream per call: one call's reply stays small (peak RSS at 20,000
#: events/s: 46 MiB, against 52 with 1,000), and a full batch tells the tailer it is behind.
READ_COUNT = 250
#: Entries one read may bring over every stream: with many queues, fewer per stream.
READ_TOTAL = 50_000
#: Milliseconds a read blocks when nothing happens; new queues join after at most this.
BLOCK_MS = 2000
#: Seconds the tailer waits after a read that was not full, so that the next read takes
#: a batch rather than a handful: a read's fixed cost (the command over every stream, the
#: reply, a loop turn) is paid per batch. Counters lag by at most this, far less than a
#: scrape interval or than a 10,000-entry stream lasts.
READ_PAUSE = 0.1
#: Seconds between two log lines about job timings dropped.
DROPPED_LOG_INTERVAL = 600.0
#: Streams checked for trimmed entries in one transaction.
CHECK_BATCH = 100
#: Seconds between checks of every stream for entries trimmed before they were read.
CHECK_INTERVAL = 30.0
#: Longest wait before reconnecting; the first is one second, doubling.
MAX_BACKOFF = 30.0

log = logging.getLogger("jobstats_exporter")


class Timings:
    """One histogram's counts per bucket (not cumulative, +Inf last) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # `le` is inclusive: a value equal to a bound falls in that bound's bucket.
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))

    def copy(self) -> Timings:
        other = Timings()
        other.counts = list(self.counts)
        other.total = self.total
        return other


@dataclass(slots=True)
class QueueCounts:
    """What one queue's stream has told since the exporter first saw the queue."""

    completed: int = 0
    failed: int = 0
    retries: int = 0
    missed: int = 0
    wait: Timings = field(default_factory=Timings)
    run_completed: Timings = field(default_factory=Timings)
    run_failed: Timings = field(default_factory=Timings)

    def copy(self) -> QueueCounts:
        return QueueCounts(
            self.completed,
            self.failed,
            self.retries,
            self.missed,
            self.wait.copy(),
            self.run_completed.copy(),
            self.run_failed.copy(),
        )


class EventCounts:
    """Counters and timings of BullMQ events, per queue; pure, no I/O.

    What each event means is read from BullMQ's Lua scripts: `completed` and `failed`
    (moveToFinished) end a job for good; `waiting` with `prev: active` (retryJob, a
    stalled job recovered, a rate-limited job) and `delayed` of a running job
    (moveToDelayed, a retry with backoff) end an attempt that will be retried; `waiting`
    marks a job ready, `active` its start. Entry ids are the milliseconds of the write.
    """

    def __init__(self, max_pending: int = MAX_PENDING_JOBS) -> None:
        self.queues: dict[str, QueueCounts] = {}
        self.max_pending = max_pending
        #: Jobs not timed because the pending maps were full.
        self.dropped = 0
        # (queue, job id) -> milliseconds; insertion order is age order, oldest first.
        self._ready: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._active: OrderedDict[tuple[str, str], int] = OrderedDict()

    def queue(self, name: str) -> QueueCounts:
        """The queue's counts, at 0 when it is first seen."""
        counts = self.queues.get(name)
        if counts is None:
            counts = self.queues[name] = QueueCounts()
        return counts

    def apply(self, queue: str, entry_id: str, fields: Mapping[str, str]) -> None:
        """Count one stream entry of `queue`."""
        event = fields.get("event")
        job = fields.get("jobId")
        if job is None or event is None:
            return  # paused, resumed, drained, cleaned: no job moves
        counts = self.queue(queue)
        key = (queue, job)
        at = _milliseconds(entry_id)
        if event == "active":
            ready = self._ready.pop(key, None)
            if ready is not None:
                counts.wait.observe(max(0, at - ready) / 1000)
            self._remember(self._active, key, at)
        elif event == "completed":
            counts.completed += 1
            self._ended(counts.run_completed, key, at)
        elif event == "failed":
            counts.failed += 1
            self._ended(counts.run_failed, key, at)
        elif event == "waiting":
            if fields.get("prev") == "active":
                counts.retries += 1
                self._ended(counts.run_failed, key, at)
            self._remember(self._ready, key, at)
        elif event == "delayed":
            # A new delayed job, or one whose delay changed, was never seen running.
            if key in self._active:
                counts.retries += 1
                self._ended(counts.run_failed, key, at)
            self._ready.pop(key, None)
        elif event in ("removed", "waiting-children"):
            self._ready.pop(key, None)
            self._active.pop(key, None)

    def _ended(self, timings: Timings, key: tuple[str, str], at: int) -> None:
        started = self._active.pop(key, None)
        if started is not None:
            timings.observe(max(0, at - started) / 1000)

    def _remember(
        self, pending: OrderedDict[tuple[str, str], int], key: tuple[str, str], at: int
    ) -> None:
        pending.pop(key, None)  # a job seen again moves to the young end
        if len(self._ready) + len(self._active) >= self.max_pending:
            # Keep the oldest: in a backlog they are the next to start, and their times
            # are the ones worth having. Only one pending past STALE_MS (its end was never
            # written: a drained queue, a lost Redis) makes room.
            older = min(
                (entries for entries in (self._ready, self._active) if entries),
                key=lambda entries: next(iter(entries.values())),
            )
            self.dropped += 1
            if at - next(iter(older.values())) <= STALE_MS:
                return
            older.popitem(last=False)
        pending[key] = at

    @property
    def pending(self) -> int:
        return len(self._ready) + len(self._active)

    def forget(self, queue: str) -> None:
        """Drop a queue's timing state (its counters stay): the queue left Redis."""
        for pending in (self._ready, self._active):
            for key in [key for key in pending if key[0] == queue]:
                del pending[key]


def _milliseconds(entry_id: str) -> int:
    stamp, _, _ = entry_id.partition("-")
    return int(stamp) if stamp.isdigit() else 0


@dataclass(slots=True)
class _Position:
    """Where the tailer stands in one stream.

    `base` is the stream's entries-added when the tailer attached at `last_id`; every
    entry added since is either read or missed, so a stream at its tail whose
    entries-added exceeds base + read + missed lost entries to a trim.
    """

    last_id: str
    base: int
    read: int = 0
    missed: int = 0
    #: Check for trimmed entries before the next read: after a reconnect or a full batch.
    suspect: bool = False
    #: Read only once a scrape has shown the queue's counters: a new series must start
    #: from a value Prometheus saw, or increase() misses its first jobs.
    shown: bool = True


@dataclass(frozen=True, slots=True)
class RedisView:
    """What one scrape shows of a Redis source, keyed by `queue` label."""

    up: bool
    counts: Mapping[str, QueueCounts]
    oldest_waiting: Mapping[str, float] | None
    workers: Mapping[str, int] | None
    timings_dropped: int
    #: The card read from Redis, for a target without a stats API; else None.
    card: Stats | None = None
    #: Why the card could not be read this scrape (a target without a stats API only).
    card_error: FetchError | None = None


class Tailer:
    """Follows every BullMQ queue's event stream of one Redis; runs on the exporter's loop.

    `run()` is the task: it discovers queues, reads their streams and reconnects by
    itself. `view()` is what a scrape calls: counters from memory, plus this scrape's
    reads of the oldest waiting job and of the workers, under the scrape's deadline.
    """

    def __init__(
        self,
        source: RedisSource,
        max_queues: int,
        max_name_length: int,
        discovery_interval: float = CHECK_INTERVAL,
        connect: Callable[[RedisSource], Redis] = bullmq.connect,
        clock: Callable[[], float] = time.time,
        card: bool = False,
    ) -> None:
        self.source = source
        #: Read the card too (counts, status, schedules): the target has no stats API.
        self.card = card
        self.max_queues = max_queues
        self.max_name_length = max_name_length
        self.discovery_interval = discovery_interval
        self.counts = EventCounts()
        self.clock = clock
        self._connect = connect
        self._where = bullmq.where(source)
        self._positions: dict[str, _Position] = {}
        self._client: Redis | None = None
        self._reader: Redis | None = None
        #: The tailer's own last attempt worked.
        self.connected = False
        self._started = False
        self._client_list_refused = False
        self._dropped_logged = 0
        self._dropped_log_after = 0.0
        self._inflight: asyncio.Future[Any] | None = None
        #: Queues left out at the last discovery: (too long or same label, over max_queues).
        self._left_out = (0, 0)

    @property
    def queues(self) -> bullmq.Queues:
        return bullmq.Queues(
            self.source.prefix, {name: self.source.label(name) for name in self._positions}
        )

    # --- the task ----------------------------------------------------------------------

    async def run(self) -> None:
        """Tail until cancelled: discover, read, and reconnect after any Redis fault."""
        from redis.exceptions import RedisError

        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                if self.connected:
                    failures = 0  # a session that worked: the next try comes soon again
                if failures == 0:
                    log.warning(
                        "redis source unavailable",
                        extra={"redis": self._where, "err": _describe(error)},
                    )
                self.connected = False
                failures += 1
                await self._close_clients()
                await asyncio.sleep(min(MAX_BACKOFF, 2 ** min(failures - 1, 5)))
            else:
                return

    async def _session(self) -> None:
        client = self._client = self._connect(self.source)
        # The blocking read gets a connection of its own, read timeout past its block.
        reader = self._reader = self._connect(self.source)
        await client.ping()
        for position in self._positions.values():
            position.suspect = True
        await self._discover(client)
        # Up once the queues are known: a queue found after this is new, counted whole.
        self.connected = True
        log.info(
            "redis source connected",
            extra={"redis": self._where, "queues": len(self._positions)},
        )
        next_discovery = self.clock() + self.discovery_interval
        while True:
            if self.clock() >= next_discovery:
                await self._discover(client)
                for position in self._positions.values():
                    position.suspect = True
                next_discovery = self.clock() + self.discovery_interval
            await self._check_trimmed(client)
            await self._read(reader)
            self.connected = True

    async def _discover(self, client: Redis) -> None:
        found = await bullmq.discover_queues(client, self.source.prefix)
        usable = sorted(name for name in found if len(name) <= self.max_name_length)
        # Two queues must not share a label (a queue_names entry naming another queue's
        # name): the first by name keeps it, the other is left out.
        labels: dict[str, str] = {}
        for name in usable:
            labels.setdefault(self.source.label(name), name)
        kept = sorted(labels.values())
        left_out = (len(found) - len(kept), max(0, len(kept) - self.max_queues))
        if left_out != self._left_out and any(left_out):
            log.warning(
                "redis queues left out",
                extra={
                    "redis": self._where,
                    "too_long_or_same_label": left_out[0],
                    "over_max_queues": left_out[1],
                },
            )
        self._left_out = left_out
        kept = kept[: self.max_queues]
        new = [name for name in kept if name not in self._positions]
        if new:
            await self._attach(client, new, at_tail=not self._started)
        for name in [name for name in self._positions if name not in kept]:
            # Gone (obliterated, or Redis restarted empty): its timings go; its counters
            # stay, to carry on if it comes back, unless queues come and go by thousands.
            del self._positions[name]
            self.counts.forget(name)
        if len(self.counts.queues) > 2 * self.max_queues:
            for name in [name for name in self.counts.queues if name not in self._positions]:
                del self.counts.queues[name]
        self._started = True

    async def _attach(self, client: Redis, names: list[str], at_tail: bool) -> None:
        """Start following `names`: at their tail at start-up, else from their first entry."""
        prefix = self.source.prefix
        infos: list[Any] = []
        if at_tail:
            async with client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.xinfo_stream(bullmq.stream_key(prefix, name))
                infos = await pipe.execute(raise_on_error=False)
        for index, name in enumerate(names):
            self.counts.queue(name)
            info = infos[index] if at_tail else None
            if isinstance(info, dict):
                # History is not counted: start after the last entry, at its entries-added.
                position = _Position(
                    str(info.get("last-generated-id", "0-0")), int(info.get("entries-added", 0))
                )
            else:
                # A queue created after start (or with no stream yet) counts from its first
                # entry, once a scrape has shown its counters as they stand.
                position = _Position("0-0", 0, shown=False)
            self._positions[name] = position

    async def _read(self, reader: Redis) -> None:
        if not self._positions:
            await asyncio.sleep(BLOCK_MS / 1000)
            return
        prefix = self.source.prefix
        names = {
            bullmq.stream_key(prefix, name): name
            for name, position in self._positions.items()
            if position.shown
        }
        if not names:
            await asyncio.sleep(BLOCK_MS / 1000)
            return
        streams: dict[Any, Any] = {
            key: self._positions[name].last_id for key, name in names.items()
        }
        count = max(10, min(READ_COUNT, READ_TOTAL // len(streams)))
        reply = await reader.xread(streams, count=count, block=BLOCK_MS)
        behind = False
        for key, entries in _stream_replies(reply):
            name = names.get(key)
            position = self._positions.get(name) if name else None
            if name is None or position is None:
                continue
            self._apply(name, position, entries)
            if len(entries) >= count:
                position.suspect = behind = True
            # The loop also serves the scrapes: a large read is counted a stream at a time.
            await asyncio.sleep(0)
        if reply and not behind:
            await asyncio.sleep(READ_PAUSE)

    def _apply(self, name: str, position: _Position, entries: list[Any]) -> None:
        apply = self.counts.apply
        for entry_id, fields in entries:
            apply(name, entry_id, fields or {})
        if entries:
            position.last_id = entries[-1][0]
            position.read += len(entries)

    async def _check_trimmed(self, client: Redis) -> None:
        """Count the entries trimmed before they were read, for each suspect stream.

        Atomically (one transaction per CHECK_BATCH streams), XINFO STREAM and the entries
        after the last one read: once those reach the tail, entries-added less what was read
        and missed is what a trim took unread. Redis before 7 reports no entries-added: the
        gap is logged, not counted.
        """
        suspects = [
            name
            for name, position in self._positions.items()
            if position.suspect and position.shown
        ]
        prefix = self.source.prefix
        for start in range(0, len(suspects), CHECK_BATCH):
            chunk = suspects[start : start + CHECK_BATCH]
            async with client.pipeline(transaction=True) as pipe:
                for name in chunk:
                    key = bullmq.stream_key(prefix, name)
                    pipe.xinfo_stream(key)
                    pipe.xrange(key, min=f"({self._positions[name].last_id}", count=READ_COUNT)
                replies = await pipe.execute(raise_on_error=False)
            for index, name in enumerate(chunk):
                position = self._positions[name]
                info, entries = replies[2 * index], replies[2 * index + 1]
                if not isinstance(info, dict) or isinstance(entries, Exception):
                    position.suspect = False  # no stream yet: nothing added, nothing missed
                    continue
                self._apply(name, position, entries)
                if len(entries) < READ_COUNT:
                    self._settle(name, position, info)
                    position.suspect = False
                # Else still behind: checked again after the next read.

    def _settle(self, name: str, position: _Position, info: Mapping[str, Any]) -> None:
        added = info.get("entries-added")
        if added is None:
            first = info.get("first-entry")
            first_id = first[0] if first else None
            if first_id and _id_after(first_id, position.last_id) and position.read:
                log.warning(
                    "stream entries trimmed before they were read; Redis < 7 cannot count them",
                    extra={"redis": self._where, "queue": self.source.label(name)},
                )
            return
        unaccounted = int(added) - position.base - position.read - position.missed
        if unaccounted > 0:
            position.missed += unaccounted
            self.counts.queue(name).missed += unaccounted
            log.warning(
                "stream entries trimmed before they were read",
                extra={
                    "redis": self._where,
                    "queue": self.source.label(name),
                    "count": unaccounted,
                },
            )
        elif unaccounted < 0:
            # The stream was deleted and made anew (an obliterated queue, a Redis restart
            # without persistence): what it holds now is all read, so start counting here.
            position.base = int(added) - position.read - position.missed

    async def _close_clients(self) -> None:
        for client in (self._client, self._reader):
            if client is not None:
                # Closing a broken connection may fail any way; it is being dropped.
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._client = self._reader = None

    async def close(self) -> None:
        await self._close_clients()

    # --- a scrape ----------------------------------------------------------------------

    async def view(self, deadline: float) -> RedisView:
        """This scrape's view: counters from memory, the rest read within `deadline` s.

        Scrapes that arrive while a read is in flight share it, each under its own deadline.
        A tailer that reads the card (a target without a stats API) hands a failed read to
        the caller, which logs it as a failed scrape; any other logs it here.
        """
        from redis.exceptions import RedisError

        labels = self.queues.labels
        counts = {labels[name]: self.counts.queue(name).copy() for name in self._positions}
        for position in self._positions.values():
            position.shown = True
        oldest: Mapping[str, float] | None = None
        workers: Mapping[str, int] | None = None
        card: Stats | None = None
        error: FetchError | None = None
        client = self._client
        if client is None or not self.connected:
            error = FetchError("connect", f"{self._where}: not connected")
        else:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self._read_state(client))
                self._inflight.add_done_callback(self._read_done)
            try:
                async with asyncio.timeout(deadline):
                    oldest, workers, card = await asyncio.shield(self._inflight)
            except TimeoutError:
                error = FetchError(
                    "timeout", f"{self._where}: no complete answer within {deadline:g}s"
                )
            except (RedisError, OSError) as failure:
                error = FetchError("connect", f"{self._where}: {_describe(failure)}")
            else:
                if card is not None:
                    card = replace(card, dropped_queues=self._left_out[1])
        if error is not None and not self.card and self.connected:
            log.warning(
                "redis source read failed", extra={"reason": error.reason, "err": str(error)}
            )
        now = self.clock()
        if self.counts.dropped > self._dropped_logged and now >= self._dropped_log_after:
            # Under a lasting backlog this grows at every scrape: say so now and then.
            log.info(
                "job timings dropped: too many jobs pending",
                extra={"redis": self._where, "count": self.counts.dropped - self._dropped_logged},
            )
            self._dropped_logged = self.counts.dropped
            self._dropped_log_after = now + DROPPED_LOG_INTERVAL
        return RedisView(
            error is None,
            counts,
            oldest,
            workers,
            self.counts.dropped,
            card,
            error if self.card else None,
        )

    async def _read_state(
        self, client: Redis
    ) -> tuple[Mapping[str, float], Mapping[str, int] | None, Stats | None]:
        from redis.exceptions import ResponseError

        queues = self.queues
        oldest = await bullmq.oldest_waiting_ages(client, queues, self.clock())
        workers = await self._workers(client, queues, ResponseError)
        card = await bullmq.read_stats(client, queues, workers) if self.card else None
        return oldest, workers, card

    def _read_done(self, read: asyncio.Future[Any]) -> None:
        self._inflight = None
        if not read.cancelled():
            read.exception()  # retrieved here: a scrape that gave up would leave it unread

    async def _workers(
        self, client: Redis, queues: bullmq.Queues, refused: type[Exception]
    ) -> dict[str, int] | None:
        try:
            names = await bullmq.client_names(client)
        except refused as error:
            if not self._client_list_refused:
                log.warning(
                    "CLIENT LIST refused: jobstats_queue_workers is left out",
                    extra={"redis": self._where, "err": _describe(error)},
                )
            self._client_list_refused = True
            return None
        self._client_list_refused = False
        return bullmq.workers_per_queue(names, queues)


def _stream_replies(reply: Any) -> Iterable[tuple[str, list[Any]]]:
    """XREAD's reply as (stream key, entries), for RESP2's list and RESP3's map."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(key, list(entries)) for key, entries in reply.items()]
    return [(key, list(entries)) for key, entries in reply]


def _id_after(a: str, b: str) -> bool:
    def parts(entry_id: str) -> tuple[int, int]:
        ms, _, seq = entry_id.partition("-")
        return int(ms or 0), int(seq or 0)

    return parts(a) > parts(b)


def _describe(error: BaseException) -> str:
    """The error's kind and text; redis-py's texts hold no credentials."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
