"""Cron patterns read the BullMQ way: seconds first, time zones, words, caching."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

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


def test_invalid_pattern_is_cached_as_invalid() -> None:
    schedules = CronSchedules("UTC")
    assert schedules.at("bad", NOW) is None
    assert schedules.at("bad", NOW + 1) is None


def test_cache_forgets_the_least_recently_used_pattern_beyond_its_bound() -> None:
    schedules = CronSchedules("UTC", max_patterns=2)
    a = schedules.at("*/6 * * * *", NOW)
    schedules.at("*/7 * * * *", NOW)
    schedules.at("*/6 * * * *", NOW)  # touch: now the most recent
    schedules.at("*/8 * * * *", NOW)  # evicts */7
    assert schedules.at("*/6 * * * *", NOW) is a
    assert len(schedules._cache) == 2
    assert "*/7 * * * *" not in schedules._cache
