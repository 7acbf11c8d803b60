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
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .model import Limits, Stats
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
    from urllib.parse import urlsplit

    parts = urlsplit(source.url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{shown}{port}{parts.path}"


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
