"""Limits on one answer: the excess is dropped and counted, never a failed scrape or a cut name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.client import StatsClient
from exporter.collector import JobStatsCollector, ScrapeErrors, render_text
from exporter.model import Limits, parse_stats
from exporter.schedule import CronSchedules
from exporter.targets import Target

from samples import sample


def queue(**extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "waiting": 1,
        "active": 0,
        "completed": 2,
        "failed": 0,
        "delayed": 0,
        "status": "active",
    }
    entry.update(extra)
    return entry


def answer(queues: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "success": True,
        "stats": {**queues, "redisStatus": "enabled"},
        "redisAvailable": True,
    }


def body(queues: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps(answer(queues)).encode()


def many_queues(count: int) -> dict[str, dict[str, Any]]:
    return {f"q{index:05d}": queue(waiting=index) for index in range(count)}


def test_queues_over_max_queues_are_dropped_and_counted_in_order() -> None:
    stats = parse_stats(body(many_queues(10_000)), Limits(max_queues=1000))
    assert [q.name for q in stats.queues] == [f"q{index:05d}" for index in range(1000)]
    assert [q.waiting for q in stats.queues] == list(range(1000))
    assert stats.dropped_queues == 9000
    assert stats.dropped_long_names == 0
    assert stats.invalid == ()


def test_at_most_max_queues_nothing_is_dropped() -> None:
    stats = parse_stats(body(many_queues(3)), Limits(max_queues=3))
    assert len(stats.queues) == 3
    assert stats.dropped_queues == 0


def test_exactly_max_queues_are_kept_and_one_more_is_dropped() -> None:
    at_cap = parse_stats(body(many_queues(3)), Limits(max_queues=3))
    over_cap = parse_stats(body(many_queues(4)), Limits(max_queues=3))
    assert [q.name for q in at_cap.queues] == ["q00000", "q00001", "q00002"]
    assert at_cap.dropped_queues == 0
    assert [q.name for q in over_cap.queues] == ["q00000", "q00001", "q00002"]
    assert over_cap.dropped_queues == 1


def test_exactly_max_extra_states_are_kept_and_one_more_is_dropped() -> None:
    four = {f"state{index}": index for index in range(4)}
    at_cap = parse_stats(body({"q": queue(**four)}), Limits(max_extra_states=4))
    over_cap = parse_stats(body({"q": queue(**four, state4=4)}), Limits(max_extra_states=4))
    assert at_cap.queues[0].extra_states == tuple(four.items())
    assert at_cap.dropped_states == 0
    assert over_cap.queues[0].extra_states == tuple(four.items())
    assert over_cap.dropped_states == 1


def test_a_long_queue_name_is_dropped_whole_never_cut() -> None:
    long_name, at_cap = "x" * 10_000, "y" * 200
    stats = parse_stats(
        body({"before": queue(), long_name: queue(), at_cap: queue(), "after": queue()}),
        Limits(max_queue_name_length=200),
    )
    assert [q.name for q in stats.queues] == ["before", at_cap, "after"]
    assert stats.dropped_long_names == 1
    assert stats.dropped_queues == 0
    assert all(not name.startswith("x") for name in (q.name for q in stats.queues))


def test_names_that_a_cut_would_merge_stay_two_queues() -> None:
    a, b = "shared-prefix-" + "a" * 20, "shared-prefix-" + "b" * 20
    stats = parse_stats(
        body({a: queue(waiting=1), b: queue(waiting=2)}), Limits(max_queue_name_length=len(a))
    )
    assert [(q.name, q.waiting) for q in stats.queues] == [(a, 1), (b, 2)]
    stats = parse_stats(
        body({a: queue(waiting=1), b: queue(waiting=2)}), Limits(max_queue_name_length=20)
    )
    assert stats.queues == ()
    assert stats.dropped_long_names == 2


def test_long_names_are_counted_apart_from_max_queues() -> None:
    queues = many_queues(5)
    queues["z" * 300] = queue()
    stats = parse_stats(body(queues), Limits(max_queues=2, max_queue_name_length=200))
    assert len(stats.queues) == 2
    assert (stats.dropped_queues, stats.dropped_long_names) == (3, 1)


def test_extra_states_over_the_cap_are_dropped_and_counted() -> None:
    extra = {f"state{index:02d}": index for index in range(10)}
    stats = parse_stats(body({"q": queue(**extra)}), Limits(max_extra_states=4))
    (parsed,) = stats.queues
    assert parsed.extra_states == tuple((f"state{index:02d}", index) for index in range(4))
    assert stats.dropped_states == 6
    # The five base states are never dropped.
    assert [state for state, _ in parsed.states()][:5] == [
        "waiting",
        "active",
        "completed",
        "failed",
        "delayed",
    ]


def test_dropped_states_add_up_over_queues() -> None:
    stats = parse_stats(
        body({"a": queue(p=1, r=2, s=3), "b": queue(p=1), "c": queue(p=1, r=2)}),
        Limits(max_extra_states=1),
    )
    assert [len(q.extra_states) for q in stats.queues] == [1, 1, 1]
    assert stats.dropped_states == 3


def test_a_long_extra_state_name_is_dropped_and_counted() -> None:
    long_state, at_cap = "s" * 201, "t" * 200
    stats = parse_stats(
        body({"q": queue(**{long_state: 1, at_cap: 2, "paused": 3})}),
        Limits(max_queue_name_length=200),
    )
    (parsed,) = stats.queues
    assert parsed.extra_states == ((at_cap, 2), ("paused", 3))
    assert stats.dropped_states == 1


def test_a_long_extra_state_does_not_use_up_max_extra_states() -> None:
    stats = parse_stats(
        body({"q": queue(**{"s" * 50: 1, "paused": 3})}),
        Limits(max_extra_states=1, max_queue_name_length=10),
    )
    assert stats.queues[0].extra_states == (("paused", 3),)
    assert stats.dropped_states == 1


def test_malformed_queues_do_not_use_up_max_queues() -> None:
    stats = parse_stats(
        body(
            {
                "bad1": queue(failed="abc"),
                "bad2": queue(waiting=-1),
                "good1": queue(),
                "good2": queue(),
                "good3": queue(),
            }
        ),
        Limits(max_queues=2),
    )
    assert [q.name for q in stats.queues] == ["good1", "good2"]
    assert len(stats.invalid) == 2
    assert stats.dropped_queues == 1


def test_default_limits_keep_the_captured_answer_whole() -> None:
    stats = parse_stats(json.dumps(sample("enabled")).encode())
    assert [q.name for q in stats.queues] == ["inventory", "product"]
    assert (stats.dropped_queues, stats.dropped_long_names, stats.dropped_states) == (0, 0, 0)


def test_the_default_limits() -> None:
    assert Limits() == Limits(max_queues=1000, max_extra_states=32, max_queue_name_length=200)


# Through the collector


@pytest.fixture
def served() -> dict[str, bytes]:
    return {"body": b"{}"}


@pytest.fixture
def client(served: dict[str, bytes]) -> Iterator[StatsClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=served["body"])

    target = Target(
        name="test",
        url="http://api.test/api/jobs/stats",
        timeout=5.0,
        max_body_size=16 * 1024 * 1024,
    )
    stats_client = StatsClient(target, httpx.MockTransport(handler))
    yield stats_client
    asyncio.run(stats_client.close())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def scrape(client: StatsClient) -> Callable[[Limits], Samples]:
    schedules = CronSchedules("UTC")

    def scrape_once(limits: Limits) -> Samples:
        collector = JobStatsCollector(client, 5.0, schedules, ScrapeErrors(), limits)
        text = render_text(asyncio.run(collector.families()))
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    return scrape_once


def dropped_queues(values: Samples, limit: str) -> float:
    return values[("jobstats_dropped_queues", (("limit", limit),))]


def test_limits_show_as_dropped_counts_in_a_successful_scrape(
    served: dict[str, bytes], scrape: Callable[[Limits], Samples]
) -> None:
    queues = many_queues(10_000)
    queues["x" * 10_000] = queue()
    queues["q00000"] = queue(**{f"extra{index}": index for index in range(40)})
    served["body"] = body(queues)
    values = scrape(Limits())
    assert values[("jobstats_up", ())] == 1
    assert values[("jobstats_queues", ())] == 1000
    assert dropped_queues(values, "max_queues") == 9000
    assert dropped_queues(values, "max_queue_name_length") == 1
    assert values[("jobstats_dropped_states", ())] == 8
    exported = {labels for name, labels in values if name == "jobstats_queue_jobs"}
    names = {dict(labels)["queue"] for labels in exported}
    assert names == {f"q{index:05d}" for index in range(1000)}


def test_a_scrape_within_the_limits_exports_zero_dropped(
    served: dict[str, bytes], scrape: Callable[[Limits], Samples]
) -> None:
    served["body"] = body(many_queues(2))
    values = scrape(Limits(max_queues=2, max_extra_states=1, max_queue_name_length=6))
    assert values[("jobstats_up", ())] == 1
    assert dropped_queues(values, "max_queues") == 0
    assert dropped_queues(values, "max_queue_name_length") == 0
    assert values[("jobstats_dropped_states", ())] == 0


def test_the_collectors_limits_are_the_ones_applied(
    served: dict[str, bytes], scrape: Callable[[Limits], Samples]
) -> None:
    served["body"] = body({"abcdef": queue(p=1, r=2), "abcdefg": queue(), "b": queue()})
    values = scrape(Limits(max_queues=1, max_extra_states=1, max_queue_name_length=6))
    assert values[("jobstats_up", ())] == 1
    assert dropped_queues(values, "max_queues") == 1
    assert dropped_queues(values, "max_queue_name_length") == 1
    assert values[("jobstats_dropped_states", ())] == 1
    assert values[("jobstats_queue_jobs", (("queue", "abcdef"), ("state", "p")))] == 1
    assert ("jobstats_queue_jobs", (("queue", "abcdef"), ("state", "r"))) not in values


def test_no_dropped_counts_when_the_scrape_failed(
    served: dict[str, bytes], scrape: Callable[[Limits], Samples]
) -> None:
    served["body"] = b"not json"
    values = scrape(Limits())
    assert values[("jobstats_up", ())] == 0
    assert not any(name.startswith("jobstats_dropped") for name, _ in values)
