"""`jobstats-exporter check` prints the admin card: statuses, counts, schedule, countdown."""

from __future__ import annotations

import json

import pytest

from exporter.card import countdown, render_card
from exporter.cli import main
from exporter.model import parse_stats
from exporter.schedule import CronSchedules

from samples import sample, sample_bytes

NEXT_RUN = 1_795_772_160.0  # the samples' nextRun, in seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (192, "in 3m 12s"),
        (0, "in 0s"),
        (59.9, "in 59s"),
        (3600, "in 1h"),
        (3725, "in 1h 2m"),
        (90061, "in 1d 1h"),
        (-120, "overdue 2m"),
        (-125, "overdue 2m 5s"),
    ],
)
def test_countdown(seconds: float, text: str) -> None:
    assert countdown(seconds) == text


def test_card_shows_redis_queues_counts_schedule_and_countdown() -> None:
    stats = parse_stats(sample_bytes("enabled"))
    card = render_card(stats, NEXT_RUN - 192, CronSchedules("UTC"), "http://api/")
    assert "Redis: Enabled, available" in card
    assert "inventory  [active]" in card
    assert "waiting 0   active 0   completed 5   failed 3   delayed 1" in card
    assert "recurring: 1 job, */6 * * * * (Every 6 minutes), next run in 3m 12s" in card
    assert "System: healthy; 2 queues; total completed 5" in card


def test_card_flags_a_stopped_queue_and_an_overdue_run() -> None:
    stats = parse_stats(sample_bytes("worker-stopped"))
    card = render_card(stats, NEXT_RUN + 120, CronSchedules("UTC"), "http://api/")
    assert "product  [stopped]" in card
    assert "next run overdue 2m" in card
    assert "System: needs attention" in card


@pytest.mark.parametrize("seconds_late", [30, 61, 119, 120])
def test_a_run_late_by_up_to_the_two_minute_grace_is_not_overdue(seconds_late: int) -> None:
    # A busy worker starts a run a little late; the card, like the alert, waits out 120 s.
    stats = parse_stats(sample_bytes("enabled"))
    card = render_card(stats, NEXT_RUN + seconds_late, CronSchedules("UTC"), "x")
    assert "System: healthy" in card


@pytest.mark.parametrize("seconds_late", [121, 181])
def test_a_run_late_past_the_two_minute_grace_needs_attention(seconds_late: int) -> None:
    stats = parse_stats(sample_bytes("enabled"))
    card = render_card(stats, NEXT_RUN + seconds_late, CronSchedules("UTC"), "x")
    assert "System: needs attention" in card


def test_card_counts_one_queue_in_the_singular() -> None:
    document = sample("enabled")
    del document["stats"]["product"]
    card = render_card(parse_stats(json.dumps(document).encode()), 0, CronSchedules("UTC"), "x")
    assert "; 1 queue; " in card


def test_card_of_redis_down_says_disabled_and_unavailable() -> None:
    card = render_card(parse_stats(sample_bytes("redis-down")), 0, CronSchedules("UTC"), "x")
    assert "Redis: Disabled, unavailable" in card
    assert "0 queues" in card


def test_card_shows_an_unknown_status_as_sent() -> None:
    document = sample("enabled")
    document["stats"]["product"]["status"] = "draining"
    card = render_card(parse_stats(json.dumps(document).encode()), 0, CronSchedules("UTC"), "x")
    assert "product  [draining]" in card


def test_card_escapes_control_characters_in_upstream_text() -> None:
    document = sample("enabled")
    document["stats"] = {"evil\x1b[2Jname": document["stats"]["inventory"]}
    card = render_card(parse_stats(json.dumps(document).encode()), 0, CronSchedules("UTC"), "x")
    assert "\x1b" not in card
    assert "evil\\u001b[2Jname" in card


def test_card_colors_badges_only_when_asked() -> None:
    stats = parse_stats(sample_bytes("queue-paused"))
    plain = render_card(stats, 0, CronSchedules("UTC"), "x")
    colored = render_card(stats, 0, CronSchedules("UTC"), "x", color=True)
    assert "\x1b[" not in plain
    assert "\x1b[33mpaused\x1b[0m" in colored


def test_card_lists_skipped_queues() -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["failed"] = -1
    card = render_card(parse_stats(json.dumps(document).encode()), 0, CronSchedules("UTC"), "x")
    assert "skipped malformed queue: stats.inventory.failed" in card


def test_check_names_the_targets_when_asked_for_an_unknown_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--target", "nope"], environ={}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "the targets are default" in err
