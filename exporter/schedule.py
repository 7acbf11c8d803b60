"""Cron patterns read as BullMQ reads them: next fire times and words.

BullMQ takes 5 fields, or 6 with seconds FIRST (`*/2 * * * * *` = every 2 s);
croniter puts seconds last unless told, so we tell it. The current time is
always a parameter. Parsing and describing cost close to a millisecond, so
both are cached per pattern, and fire times are reused until they pass.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

from cron_descriptor import ExpressionDescriptor, Options
from croniter import croniter

__all__ = ["CronSchedules", "Schedule", "describe_cron", "parse_cron"]

#: The nicknames croniter and BullMQ's cron-parser accept, spelled out for cron_descriptor.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Patterns remembered at most; the patterns come from upstream, so the cache is bounded.
MAX_PATTERNS = 4096


@dataclass(frozen=True, slots=True)
class Schedule:
    """A valid pattern and, once asked, its next two fire times (Unix seconds)."""

    pattern: str
    words: str
    next_fire_time: float
    following_fire_time: float

    @property
    def interval_seconds(self) -> float:
        """The period between the next two fires: 360 for `*/6 * * * *`."""
        return self.following_fire_time - self.next_fire_time


def parse_cron(pattern: str, now: float, zone: tzinfo, words: str | None = None) -> Schedule | None:
    """The next two fires of `pattern` after `now`, or None when BullMQ could not run it.

    `words` saves describing the pattern again when the caller already has them.
    """
    fields = pattern.split()
    if len(fields) == 1 and fields[0].lower() in NICKNAMES:
        fields = NICKNAMES[fields[0].lower()].split()
    if len(fields) not in (5, 6):
        return None
    try:
        iterator = croniter(
            " ".join(fields),
            datetime.fromtimestamp(now, zone),
            second_at_beginning=len(fields) == 6,
        )
        first = iterator.get_next(float)
        second = iterator.get_next(float)
    except (ValueError, KeyError, IndexError, OverflowError):
        # croniter's own errors are ValueErrors; the others come from odd input it does not check.
        return None
    return Schedule(pattern, words or describe_cron(pattern), first, second)


def describe_cron(pattern: str) -> str:
    """The pattern in words ("Every 6 minutes"); the pattern itself when no words fit."""
    try:
        words = ExpressionDescriptor(
            NICKNAMES.get(pattern.strip().lower(), pattern), Options(), use_24hour_time_format=True
        ).get_description()
    except Exception:  # noqa: BLE001 - cron_descriptor raises bare Exceptions on odd input
        return pattern
    return str(words)


class CronSchedules:
    """Per-pattern cache of schedules in one time zone, safe to share between threads.

    A cached schedule is reused while `now` is before its next fire time, so a
    thousand queues on one pattern cost one croniter call per period.
    """

    def __init__(self, zone: tzinfo | str = "UTC", max_patterns: int = MAX_PATTERNS) -> None:
        self.zone = ZoneInfo(zone) if isinstance(zone, str) else zone
        self._max_patterns = max_patterns
        self._cache: OrderedDict[str, Schedule | None] = OrderedDict()
        self._lock = threading.Lock()

    def at(self, pattern: str, now: float) -> Schedule | None:
        """The schedule of `pattern` as seen at `now`; None for an invalid pattern."""
        with self._lock:
            cached = self._cache.get(pattern, _UNSEEN)
            if cached is not _UNSEEN:
                self._cache.move_to_end(pattern)
                if cached is None:
                    return None
                if now < cached.next_fire_time:
                    return cached
            words = cached.words if cached is not _UNSEEN and cached is not None else None
        fresh = parse_cron(pattern, now, self.zone, words)
        with self._lock:
            self._cache[pattern] = fresh
            self._cache.move_to_end(pattern)
            while len(self._cache) > self._max_patterns:
                self._cache.popitem(last=False)
        return fresh


_UNSEEN = Schedule("", "", 0.0, 0.0)
