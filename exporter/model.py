"""Turn the stats API's JSON answer into frozen dataclasses.

Pure: no I/O, no clock. Every value is checked, since the answer is input,
not truth. A whole-document problem raises `ParseError`; a malformed queue is
set aside in `Stats.invalid` so the other queues are still exported.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParseError

__all__ = [
    "BASE_STATES",
    "KNOWN_STATUSES",
    "Limits",
    "ParseMemo",
    "QueueStats",
    "RecurringJobs",
    "Stats",
    "parse_stats",
    "queue_path",
]

#: The counts every queue must carry, in the card's order.
BASE_STATES = ("waiting", "active", "completed", "failed", "delayed")
#: Queue statuses with a meaning; anything else is reported as "unknown".
KNOWN_STATUSES = ("active", "paused", "stopped")
#: Largest count accepted: above it a float64 gauge would no longer be exact.
MAX_COUNT = 2**53
#: Largest `nextRun` accepted (ms): the year 9999.
MAX_TIMESTAMP_MS = 253_402_300_799_999

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_NOT_QUEUE_FIELDS = frozenset({"status", "recurringJobs"})
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class RecurringJobs:
    """A queue's job schedulers, as `recurringJobs` reports them."""

    count: int
    next_run_ms: int | None
    cron: str | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue: its job counts by state, status and schedulers."""

    name: str
    waiting: int
    active: int
    completed: int
    failed: int
    delayed: int
    #: Other non-negative integer fields (BullMQ's `paused`, `prioritized`, ...).
    extra_states: tuple[tuple[str, int], ...]
    #: One of KNOWN_STATUSES or "unknown".
    status: str
    #: The status as the API sent it, for display; None when not a string.
    status_text: str | None
    recurring: RecurringJobs | None

    def states(self) -> Iterator[tuple[str, int]]:
        """Every (state, count), the five base states first."""
        yield "waiting", self.waiting
        yield "active", self.active
        yield "completed", self.completed
        yield "failed", self.failed
        yield "delayed", self.delayed
        yield from self.extra_states


@dataclass(frozen=True, slots=True)
class Limits:
    """What one answer may bring; the excess is dropped and counted, never a failed scrape."""

    max_queues: int = 1000
    #: States beyond the five base ones, per queue.
    max_extra_states: int = 32
    #: Longer queue (and state) names are dropped whole: a cut could merge two into one series.
    max_queue_name_length: int = 200


@dataclass(frozen=True, slots=True)
class Stats:
    """One valid answer of the stats API."""

    #: `redisAvailable`; None when the answer did not say (not a boolean).
    redis_available: bool | None
    #: `stats.redisStatus` as sent; None when absent or not a string.
    redis_status: str | None
    queues: tuple[QueueStats, ...]
    #: One ParseError per queue skipped because its entry was malformed.
    invalid: tuple[ParseError, ...]
    #: Queues dropped by Limits.max_queues, and by Limits.max_queue_name_length.
    dropped_queues: int = 0
    dropped_long_names: int = 0
    #: Extra states dropped by Limits.max_extra_states or for a name over the length cap.
    dropped_states: int = 0

    @property
    def redis_enabled(self) -> bool:
        return self.redis_status == "enabled"


class ParseMemo:
    """The last answer's body and what it parsed to: sent again, it is not even decoded.

    The caller keeps one per target; it is data only, so parsing stays pure.
    """

    def __init__(self) -> None:
        self.limits: Limits | None = None
        #: The SHA-256 of the last body: as sure as the body itself, and 32 bytes.
        self.digest = b""
        self.stats: Stats | None = None


def parse_stats(body: bytes, limits: Limits = Limits(), memo: ParseMemo | None = None) -> Stats:
    """Parse a raw answer body; raise ParseError when it cannot be used at all.

    With a `memo`, the body of the last answer is not parsed again, and the memo is left
    holding this answer's.
    """
    digest = hashlib.sha256(body).digest() if memo is not None else b""
    if (
        memo is not None
        and memo.stats is not None
        and (memo.limits, memo.digest)
        == (
            limits,
            digest,
        )
    ):
        return memo.stats
    document = _decode_json(body)
    if not isinstance(document, dict):
        raise ParseError("invalid_payload", "", f"expected a JSON object, got {_kind(document)}")
    if document.get("success") is not True:
        raise ParseError(
            "api_failure",
            "success",
            f"expected true, got {_show_plain(document.get('success', _MISSING))}",
        )
    stats = document.get("stats")
    if not isinstance(stats, dict):
        raise ParseError("invalid_payload", "stats", f"expected an object, got {_kind(stats)}")

    queues: list[QueueStats] = []
    invalid: list[ParseError] = []
    dropped_queues = dropped_long_names = dropped_states = 0
    for name, entry in stats.items():
        if name == "redisStatus" or not isinstance(entry, dict):
            continue
        if len(name) > limits.max_queue_name_length:
            dropped_long_names += 1
            continue
        if len(queues) >= limits.max_queues:
            dropped_queues += 1
            continue
        try:
            queue, dropped = _parse_queue(name, entry, limits)
        except ParseError as error:
            invalid.append(error)
            continue
        queues.append(queue)
        dropped_states += dropped
    redis_available = document.get("redisAvailable")
    redis_status = stats.get("redisStatus")
    result = Stats(
        redis_available=redis_available if isinstance(redis_available, bool) else None,
        redis_status=redis_status if isinstance(redis_status, str) else None,
        queues=tuple(queues),
        invalid=tuple(invalid),
        dropped_queues=dropped_queues,
        dropped_long_names=dropped_long_names,
        dropped_states=dropped_states,
    )
    if memo is not None:
        memo.limits, memo.digest, memo.stats = limits, digest, result
    return result


def queue_path(name: str) -> str:
    """The JSON path of a queue, readable and unambiguous: stats.inventory, stats["a b"]."""
    if _IDENTIFIER.match(name):
        return f"stats.{name}"
    return f"stats[{json.dumps(name)}]"


def _decode_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise ParseError("invalid_json", "", f"body is not UTF-8 (byte {error.start})") from None
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError, NaN/Infinity and over-long integers.
        raise ParseError("invalid_json", "", f"body is not JSON: {_first_line(error)}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_queue(name: str, entry: Mapping[str, Any], limits: Limits) -> tuple[QueueStats, int]:
    """The queue, and how many of its extra states the limits dropped."""
    path = queue_path(name)
    if not name:
        # Prometheus reads an empty label value as no label: the series would lose their queue.
        raise ParseError("invalid_payload", path, "a queue name must not be empty")
    counts = {state: _count(entry.get(state, _MISSING), f"{path}.{state}") for state in BASE_STATES}
    extra = [
        (field, value)
        for field, value in entry.items()
        if field not in counts
        and field not in _NOT_QUEUE_FIELDS
        and type(value) is int
        and 0 <= value <= MAX_COUNT
    ]
    kept = [state for state in extra if len(state[0]) <= limits.max_queue_name_length]
    kept = kept[: limits.max_extra_states]
    status = entry.get("status")
    # Interned: a thousand queues share one "active", not a copy each, between scrapes.
    status_text = sys.intern(status) if isinstance(status, str) else None
    queue = QueueStats(
        name=name,
        **counts,
        extra_states=tuple(kept),
        status=status_text if status_text in KNOWN_STATUSES else "unknown",
        status_text=status_text,
        recurring=_recurring(entry.get("recurringJobs"), f"{path}.recurringJobs"),
    )
    return queue, len(extra) - len(kept)


def _recurring(value: Any, path: str) -> RecurringJobs | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ParseError("invalid_payload", path, f"expected an object or null, got {_show(value)}")
    next_run = value.get("nextRun")
    if next_run is not None and not (type(next_run) is int and 0 <= next_run <= MAX_TIMESTAMP_MS):
        raise ParseError(
            "invalid_payload",
            f"{path}.nextRun",
            f"expected a timestamp in milliseconds or null, got {_show(next_run)}",
        )
    cron = value.get("cron")
    if cron is not None and not isinstance(cron, str):
        raise ParseError(
            "invalid_payload", f"{path}.cron", f"expected a string or null, got {_show(cron)}"
        )
    return RecurringJobs(
        count=_count(value.get("count", _MISSING), f"{path}.count"),
        next_run_ms=next_run,
        cron=None if cron is None else sys.intern(cron),
    )


def _count(value: Any, path: str) -> int:
    # `type(...) is int` and not isinstance: JSON true must not pass as a count.
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    raise ParseError(
        "invalid_payload", path, f"expected a non-negative integer, got {_show(value)}"
    )


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), "nothing")


def _show(value: Any) -> str:
    """A short rendering of a bad value for an error message, never more than 40 characters."""
    if value is _MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, dict | list):
        return _kind(value)
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _show_plain(value: Any) -> str:
    """Like _show, but a string or number is named by its kind only: it may be a message."""
    return (
        _show(value)
        if value is None or value is _MISSING or isinstance(value, bool)
        else _kind(value)
    )


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
