"""Cron patterns read the BullMQ way: seconds first, time zones, words, caching."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from exporter import schedule as schedule_module
from exporter.schedule import CronSchedules, describe_cron, parse_cron

# 2026-01-01 00:00:01 UTC
NOW = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp()


def at(hour: int, minute: int, second: int = 0) -> float:
    return datetime(2026, 1, 1, hour, minute, second, tzinfo=UTC).timestamp()


def test_five_fields_every_six_minutes() -> None:
    schedule = parse_cron("*/6 * * * *", NOW, UTC)
    assert schedule is not None
    assert schedule.next_fire_time == at(0, 6)
    assert schedule.interval_seconds == 360
    assert schedule.words == "Every 6 minutes"


def test_six_fields_put_seconds_first_as_bullmq_does() -> None:
    schedule = parse_cron("*/2 * * * * *", NOW, UTC)
    assert schedule is not None
    assert schedule.next_fire_time == at(0, 0, 2)
    assert schedule.interval_seconds == 2
    assert schedule.words == "Every 2 seconds"


def test_six_fields_with_seconds_zero_fire_on_the_minute_field() -> None:
    # Read seconds-last (croniter's default), this would mean "every second of minute 0".
    schedule = parse_cron("0 */6 * * * *", NOW, UTC)
    assert schedule is not None
    assert schedule.next_fire_time == at(0, 6)
    assert schedule.interval_seconds == 360


def test_pattern_is_read_in_the_configured_time_zone() -> None:
    schedule = parse_cron("0 0 * * *", NOW, ZoneInfo("Europe/Berlin"))
    assert schedule is not None
    # Midnight in Berlin (UTC+1 in January) is 23:00 UTC.
    assert schedule.next_fire_time == at(23, 0)


def test_nicknames_are_understood_and_described() -> None:
    schedule = parse_cron("@hourly", NOW, UTC)
    assert schedule is not None
    assert schedule.next_fire_time == at(1, 0)
    assert schedule.words == "Every hour"


@pytest.mark.parametrize(
    "pattern",
    ["", "bad", "* * * *", "61 * * * *", "*/0 * * * *", "0 0 30 2 *", "0 0 0 * * * 2026", "@often"],
)
def test_invalid_pattern_has_no_schedule(pattern: str) -> None:
    assert parse_cron(pattern, NOW, UTC) is None


def test_words_fall_back_to_the_pattern_when_none_fit() -> None:
    assert describe_cron("not a cron") == "not a cron"


def test_cached_schedule_is_reused_until_its_fire_time_passes() -> None:
    schedules = CronSchedules("UTC")
    first = schedules.at("*/6 * * * *", NOW)
    assert schedules.at("*/6 * * * *", NOW + 100) is first
    later = schedules.at("*/6 * * * *", at(0, 6))
    assert later is not None
    assert later.next_fire_time == at(0, 12)


class CountingCroniter:
    """croniter as schedule.py calls it, counting the patterns it is asked to parse."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> croniter:
        self.calls += 1
        return croniter(*args, **kwargs)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> CountingCroniter:
    counting = CountingCroniter()
    monkeypatch.setattr(schedule_module, "croniter", counting)
    return counting


# "61 * * * *" fails in croniter's constructor, "0 0 30 2 *" only when asked for a fire time.
@pytest.mark.parametrize("pattern", ["61 * * * *", "0 0 30 2 *"])
def test_an_invalid_pattern_is_parsed_once_not_on_every_scrape(
    parses: CountingCroniter, pattern: str
) -> None:
    schedules = CronSchedules("UTC")
    assert schedules.at(pattern, NOW) is None
    assert parses.calls == 1
    assert schedules.at(pattern, NOW + 1) is None
    assert schedules.at(pattern, NOW + 86_400) is None
    assert parses.calls == 1


def test_the_counting_croniter_sees_the_parses_of_a_valid_pattern(
    parses: CountingCroniter,
) -> None:
    # Guards the test above: were the wrapper not in the path, it would count 0 and prove nothing.
    schedules = CronSchedules("UTC")
    schedules.at("*/6 * * * *", NOW)
    schedules.at("*/6 * * * *", at(0, 6))
    assert parses.calls == 2


def test_cache_forgets_the_least_recently_used_pattern_beyond_its_bound() -> None:
    schedules = CronSchedules("UTC", max_patterns=2)
    a = schedules.at("*/6 * * * *", NOW)
    schedules.at("*/7 * * * *", NOW)
    schedules.at("*/6 * * * *", NOW)  # touch: now the most recent
    schedules.at("*/8 * * * *", NOW)  # evicts */7
    assert schedules.at("*/6 * * * *", NOW) is a
    assert len(schedules._cache) == 2
    assert "*/7 * * * *" not in schedules._cache
