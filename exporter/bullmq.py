"""BullMQ's layout in Redis: its keys, its queues, its workers, its oldest waiting job.

Everything here reads; no command that writes is ever sent. The key layout is
BullMQ's (`<prefix>:<queue>:<kind>`, job hashes at `<prefix>:<queue>:<id>`),
read from its Lua scripts; this module and `events.py` are the only ones that
know Redis. redis-py is imported by `connect()` only, so a config without a
Redis source never loads it.
"""

from __future__ import annotations

import asyncio
import base64
import math
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .client import redact_url
from .errors import ParseError
from .model import MAX_COUNT, MAX_TIMESTAMP_MS, Limits, QueueStats, RecurringJobs, Stats
from .targets import RedisSource, Secret

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "Queues",
    "check_source",
    "client_names",
    "connect",
    "discover_queues",
    "oldest_waiting_ages",
    "queue_of_meta_key",
    "read_card",
    "read_stats",
    "stream_key",
    "where",
    "workers_per_queue",
]

#: Seconds to wait for a TCP (and TLS) connection to Redis.
CONNECT_TIMEOUT = 5.0
#: Keys SCAN looks at per call: large enough to be few calls, small enough never to block.
SCAN_COUNT = 1000


def where(source: RedisSource) -> str:
    """The Redis address without credentials, for logs and errors."""
    return redact_url(source.url)


def stream_key(prefix: str, queue: str) -> str:
    """The queue's event stream."""
    return f"{prefix}:{queue}:events"


def queue_of_meta_key(prefix: str, key: str) -> str | None:
    """The queue whose meta hash is `key`, or None when `key` is not one.

    BullMQ refuses ':' in queue names, so `<prefix>:a:b:meta` is a job's key, not a queue's.
    """
    head, tail = f"{prefix}:", ":meta"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    name = key[len(head) : -len(tail)]
    return name if name and ":" not in name else None


class _FileCredentials:
    """Username and password read at each connection, so a rotated password file is used."""

    def __init__(self, username: str | None, password: Secret) -> None:
        self.username = username
        self.password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.password.read()
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def connect(source: RedisSource, read_timeout: float = 10.0) -> Redis:
    """A client of the source's Redis; it connects lazily, on its first command."""
    from urllib.parse import urlsplit

    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    parts = urlsplit(source.url)
    options: dict[str, Any] = {
        "host": parts.hostname,
        "port": parts.port or 6379,
        "db": int(parts.path.strip("/") or 0),
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": read_timeout,
        "decode_responses": True,
        # Job names and ids are the application's bytes: never fail a read on them.
        "encoding_errors": "replace",
        # The callers retry in their own time: the tailer reconnects, a scrape has a deadline.
        "retry": Retry(NoBackoff(), 0),
        "max_connections": 8,
    }
    username = source.username or parts.username
    if source.password is not None:
        options["credential_provider"] = _FileCredentials(username, source.password)
    elif username:
        options["username"] = username
    if parts.scheme == "rediss":
        tls = source.tls
        options.update(
            ssl=True,
            ssl_ca_certs=tls.ca_file,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
            ssl_cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
            ssl_check_hostname=not tls.insecure_skip_verify,
        )
    return Redis(**options)


async def discover_queues(client: Redis, prefix: str) -> set[str]:
    """Every BullMQ queue under `prefix`, found by a non-blocking SCAN of their meta hashes."""
    found: set[str] = set()
    async for key in client.scan_iter(match=f"{prefix}:*:meta", count=SCAN_COUNT, _type="hash"):
        name = queue_of_meta_key(prefix, key)
        if name is not None:
            found.add(name)
    return found


async def check_source(source: RedisSource, timeout: float) -> list[str]:
    """Connect, authenticate and find the queues, for `check`: the queue names, sorted.

    RedisError or OSError (TimeoutError included) when the source cannot be used.
    """
    client = connect(source, read_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            await client.ping()
            return sorted(await discover_queues(client, source.prefix))
    finally:
        await client.aclose()


@dataclass(frozen=True, slots=True)
class Queues:
    """The queues a scrape reads: BullMQ name to `queue` label."""

    prefix: str
    labels: Mapping[str, str]


async def oldest_waiting_ages(client: Redis, queues: Queues, now: float) -> dict[str, float]:
    """Seconds the longest-waiting job of each queue has been ready, 0 when none waits.

    Two round trips for every queue together. The candidates are both ends of the wait
    list (FIFO and LIFO jobs) and of the prioritized set; a job became ready at its
    `timestamp` plus `delay`, or at its last attempt's start when it is being retried.
    """
    prefix = queues.prefix
    names = list(queues.labels)
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.lindex(f"{prefix}:{name}:wait", -1)
            pipe.lindex(f"{prefix}:{name}:wait", 0)
            pipe.zrange(f"{prefix}:{name}:prioritized", 0, 0)
            pipe.zrange(f"{prefix}:{name}:prioritized", -1, -1)
        ends = await pipe.execute()
    candidates: dict[str, set[str]] = {}
    for index, name in enumerate(names):
        last, first, top, bottom = ends[4 * index : 4 * index + 4]
        ids = {job for job in (last, first, *top, *bottom) if job}
        # BullMQ 5 and older put "0:<delay>" markers in the wait list: they are no jobs.
        candidates[name] = {job for job in ids if not job.startswith("0:")}
    pairs = [(name, job) for name, jobs in candidates.items() for job in sorted(jobs)]
    fields: list[Sequence[str | None]] = []
    if pairs:
        async with client.pipeline(transaction=False) as pipe:
            for name, job in pairs:
                pipe.hmget(f"{prefix}:{name}:{job}", "timestamp", "delay", "processedOn")
            fields = await pipe.execute()
    ages = dict.fromkeys(names, 0.0)
    for (name, _), (created, delay, started) in zip(pairs, fields, strict=True):
        ready = _ready_at(created, delay, started)
        if ready is not None:
            ages[name] = max(ages[name], now - ready / 1000)
    return {queues.labels[name]: age for name, age in ages.items()}


def _ready_at(created: str | None, delay: str | None, started: str | None) -> float | None:
    """When a waiting job became ready, in epoch milliseconds; None when its hash is gone."""
    try:
        ready = float(created) + float(delay or 0) if created else None
        if started and ready is not None:
            ready = max(ready, float(started))
    except ValueError:
        return None
    return ready


def workers_per_queue(client_names: Iterable[str], queues: Queues) -> dict[str, int]:
    """Workers per queue label, from the names of the server's client connections.

    BullMQ names a worker's connection `<prefix>:<base64 of the queue name>`, with
    `:w:<worker name>` when the worker has a name (as `Queue.getWorkers()` matches them).
    """
    head = f"{queues.prefix}:"
    by_encoded = {
        base64.b64encode(name.encode()).decode(): label for name, label in queues.labels.items()
    }
    counts = dict.fromkeys(queues.labels.values(), 0)
    for name in client_names:
        if not name.startswith(head):
            continue
        # base64 holds no ':', so the queue part ends at the first one.
        encoded, sep, rest = name[len(head) :].partition(":")
        if sep and not rest.startswith("w:"):
            continue  # another BullMQ connection of the queue, such as QueueEvents'
        label = by_encoded.get(encoded)
        if label is not None:
            counts[label] += 1
    return counts


async def client_names(client: Redis) -> list[str]:
    """The names of the server's client connections (CLIENT LIST).

    ResponseError when the server or the ACL refuses CLIENT LIST.
    """
    return [entry.get("name", "") for entry in await client.client_list()]


async def read_card(source: RedisSource, timeout: float, limits: Limits) -> Stats:
    """The card of every queue under the source's prefix, read once (for `check`).

    RedisError or OSError (TimeoutError included) when the source cannot be used.
    """
    from redis.exceptions import ResponseError

    client = connect(source, read_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            found = sorted(await discover_queues(client, source.prefix))
            usable = [name for name in found if len(name) <= limits.max_queue_name_length]
            kept = usable[: limits.max_queues]
            queues = Queues(source.prefix, {name: source.label(name) for name in kept})
            try:
                workers: dict[str, int] | None = workers_per_queue(
                    await client_names(client), queues
                )
            except ResponseError:
                workers = None
            stats = await read_stats(client, queues, workers)
    finally:
        await client.aclose()
    return replace(
        stats,
        dropped_queues=len(usable) - len(kept),
        dropped_long_names=len(found) - len(usable),
    )


# What one queue's reply holds, in pipeline order: (kind of key, Redis type it must be).
_LIST_COUNTS = ("wait", "paused", "active")
_ZSET_COUNTS = ("completed", "failed", "delayed", "prioritized", "waiting-children")
#: Commands per queue in read_stats' first pipeline.
_PER_QUEUE = 1 + 2 * 2 + 1 + len(_ZSET_COUNTS) + 1


async def read_stats(client: Redis, queues: Queues, workers: Mapping[str, int] | None) -> Stats:
    """The card of every queue, as BullMQ's own calls report it; read-only, two round trips.

    Supported: BullMQ 5 and 6 (read from 5.81 and 6.7), whose layouts differ only where
    a paused queue keeps its jobs. Counts are `Queue.getJobCounts()`'s: `waiting` is the
    `wait` list, `active` the `active` list, the others the sorted sets' sizes; a legacy
    "0:<delay>" marker at the tail of `wait` or `paused` is no job (BullMQ's script drops it).
    `prioritized`, `waiting-children` and `paused` are extra states. `paused` is always
    exported: BullMQ 5 moves a paused queue's jobs there (and `waiting` drops to 0), while
    BullMQ 6 leaves them in `wait` and its `paused` list only holds what a BullMQ 5 pause
    left before an upgrade, normally 0; both count it in getJobCounts('paused').

    Status: "paused" when the meta hash has `paused` (as `isPaused()`), else "stopped" when
    `workers` counts no worker for the queue's label, else "active". `workers` is None when
    the server refuses CLIENT LIST: then nothing tells a stopped queue from an active one,
    and "unknown" says so rather than guess either.

    Recurring jobs are `getJobSchedulers()`: the `repeat` sorted set (score: next run, ms)
    whose members have a `repeat:<id>` hash; count, soonest next run, and its `pattern`
    (None for an `every` scheduler). A member with no hash but a legacy repeatable key's
    shape (`name:id:endDate:tz:pattern`, BullMQ < 5.16) counts as BullMQ 5 reports it,
    pattern from the key; any other member without a hash is skipped, as BullMQ does.

    A key of the wrong type or a score that is no timestamp makes that queue invalid: a
    ParseError naming the key in `Stats.invalid`; the other queues are still returned.
    The first round trip reads every queue's keys; the second the scheduler hashes.
    """
    prefix = queues.prefix
    names = list(queues.labels)
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            base = f"{prefix}:{name}:"
            pipe.hexists(base + "meta", "paused")
            for kind in ("wait", "paused"):
                pipe.llen(base + kind)
                pipe.lindex(base + kind, -1)
            pipe.llen(base + "active")
            for kind in _ZSET_COUNTS:
                pipe.zcard(base + kind)
            pipe.zrange(base + "repeat", 0, -1, withscores=True)
        replies = await pipe.execute(raise_on_error=False)

    invalid: dict[str, ParseError] = {}
    read: dict[str, tuple[bool, dict[str, int], list[tuple[str, Any]]]] = {}
    for index, name in enumerate(names):
        reply = replies[_PER_QUEUE * index : _PER_QUEUE * (index + 1)]
        try:
            read[name] = _queue_reply(prefix, name, reply)
        except ParseError as error:
            invalid[name] = error

    members = [(name, member) for name, (_, _, sched) in read.items() for member, _ in sched]
    hashes: list[Any] = []
    if members:
        async with client.pipeline(transaction=False) as pipe:
            for name, member in members:
                key = f"{prefix}:{name}:repeat:{member}"
                pipe.exists(key)
                pipe.hmget(key, "pattern", "every")
            hashes = await pipe.execute(raise_on_error=False)
    found: dict[tuple[str, str], Any] = {
        pair: hashes[2 * i : 2 * i + 2] for i, pair in enumerate(members)
    }

    result: list[QueueStats] = []
    for name, (paused, counts, schedulers) in read.items():
        label = queues.labels[name]
        try:
            recurring = _recurring(prefix, name, schedulers, found)
        except ParseError as error:
            invalid[name] = error
            continue
        if paused:
            status = "paused"
        elif workers is None:
            status = "unknown"
        else:
            status = "stopped" if workers.get(label, 0) == 0 else "active"
        result.append(
            QueueStats(
                name=label,
                waiting=counts["wait"],
                active=counts["active"],
                completed=counts["completed"],
                failed=counts["failed"],
                delayed=counts["delayed"],
                extra_states=(
                    ("prioritized", counts["prioritized"]),
                    ("waiting-children", counts["waiting-children"]),
                    ("paused", counts["paused"]),
                ),
                status=status,
                status_text=status,
                recurring=recurring,
            )
        )
    result.sort(key=lambda queue: queue.name)
    errors = sorted(invalid.items(), key=lambda item: queues.labels[item[0]])
    return Stats(
        redis_available=True,
        redis_status="enabled",
        queues=tuple(result),
        invalid=tuple(error for _, error in errors),
    )


def _queue_reply(
    prefix: str, name: str, reply: Sequence[Any]
) -> tuple[bool, dict[str, int], list[tuple[str, Any]]]:
    """(paused, counts by key kind, scheduler members with their scores) from one queue's reply."""
    base = f"{prefix}:{name}:"
    kinds = ["meta", "wait", "wait", "paused", "paused", "active", *_ZSET_COUNTS, "repeat"]
    for kind, value in zip(kinds, reply, strict=True):
        if isinstance(value, Exception):
            raise _layout_error(base + kind, value)
    paused_flag, wait_len, wait_tail, paused_len, paused_tail, active, *rest = reply
    *zset_counts, schedulers = rest
    counts = {
        "wait": _without_marker(wait_len, wait_tail),
        "paused": _without_marker(paused_len, paused_tail),
        "active": active,
        **dict(zip(_ZSET_COUNTS, zset_counts, strict=True)),
    }
    for kind, count in counts.items():
        if not (type(count) is int and 0 <= count <= MAX_COUNT):
            raise ParseError("invalid_payload", base + kind, f"expected a count, got {count!r}")
    return bool(paused_flag), counts, [(str(member), score) for member, score in schedulers]


def _without_marker(length: int, tail: str | None) -> int:
    # BullMQ 5 and older leave a "0:<delay>" marker at the tail; getJobCounts() does not count it.
    if tail is not None and tail.startswith("0:"):
        return max(length - 1, 0)
    return length


def _recurring(
    prefix: str,
    name: str,
    schedulers: Sequence[tuple[str, Any]],
    found: Mapping[tuple[str, str], Any],
) -> RecurringJobs:
    """Count, soonest next run and its pattern; count 0 and nulls with no scheduler."""
    soonest: tuple[int, str | None] | None = None
    count = 0
    for member, score in schedulers:
        key = f"{prefix}:{name}:repeat:{member}"
        exists, fields = found[(name, member)]
        for value in (exists, fields):
            if isinstance(value, Exception):
                raise _layout_error(key, value)
        if exists:
            pattern = fields[0] or None
        elif member.count(":") >= 4:
            pattern = ":".join(member.split(":")[4:]) or None
        else:
            continue
        next_run = _timestamp(score, f"{prefix}:{name}:repeat", member)
        count += 1
        if soonest is None or next_run < soonest[0]:
            soonest = (next_run, pattern)
    if soonest is None:
        return RecurringJobs(count=count, next_run_ms=None, cron=None)
    return RecurringJobs(count=count, next_run_ms=soonest[0], cron=soonest[1])


def _timestamp(score: Any, key: str, member: str) -> int:
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value.is_integer() and 0 <= value <= MAX_TIMESTAMP_MS):
        raise ParseError(
            "invalid_payload",
            key,
            f"expected a next run in milliseconds as the score of {member!r}, got {score!r}",
        )
    return int(value)


def _layout_error(key: str, error: Exception) -> ParseError:
    return ParseError("invalid_payload", key, f"not BullMQ's layout: {error}")
