"""Parsing the stats API's answer: every captured sample, every malformed field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.errors import ParseError
from exporter.model import Limits, ParseMemo, QueueStats, RecurringJobs, Stats, parse_stats

from samples import SAMPLES, sample, sample_bytes


def parse(document: Any) -> Stats:
    return parse_stats(json.dumps(document).encode())


def stats_or_error(body: bytes) -> Stats | ParseError:
    """The parser's answer, or the ParseError it raised; any other exception escapes."""
    try:
        return parse_stats(body)
    except ParseError as error:
        return error


def queue(stats: Stats, name: str) -> QueueStats:
    (found,) = [q for q in stats.queues if q.name == name]
    return found


def test_enabled_sample_gives_both_queues_with_their_counts() -> None:
    stats = parse_stats(sample_bytes("enabled"))
    assert [q.name for q in stats.queues] == ["inventory", "product"]
    inventory = queue(stats, "inventory")
    assert list(inventory.states()) == [
        ("waiting", 0),
        ("active", 0),
        ("completed", 5),
        ("failed", 3),
        ("delayed", 1),
    ]
    assert inventory.status == "active"
    assert inventory.recurring == RecurringJobs(1, 1795772160000, "*/6 * * * *")
    assert stats.redis_available is True
    assert stats.redis_enabled is True
    assert stats.invalid == ()


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_every_captured_sample_parses_without_invalid_queues(path: Any) -> None:
    stats = parse_stats(path.read_bytes())
    assert stats.invalid == ()
    assert len(stats.queues) == len(
        [v for v in json.loads(path.read_text())["stats"].values() if isinstance(v, dict)]
    )


def test_redis_down_answer_reports_no_queues() -> None:
    stats = parse_stats(sample_bytes("redis-down"))
    assert stats.queues == ()
    assert stats.redis_available is False
    assert stats.redis_enabled is False
    assert stats.redis_status == "disabled"


def test_queue_without_scheduler_has_no_next_run_nor_cron() -> None:
    stats = parse_stats(sample_bytes("no-scheduler"))
    assert queue(stats, "product").recurring == RecurringJobs(0, None, None)


def test_paused_and_stopped_statuses_are_read() -> None:
    assert queue(parse_stats(sample_bytes("queue-paused")), "inventory").status == "paused"
    assert queue(parse_stats(sample_bytes("worker-stopped")), "product").status == "stopped"


@pytest.mark.parametrize("status", ["draining", "", "ACTIVE", 5, None])
def test_any_other_status_is_unknown_but_kept_for_display(status: Any) -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["status"] = status
    inventory = queue(parse(document), "inventory")
    assert inventory.status == "unknown"
    assert inventory.status_text == (status if isinstance(status, str) else None)


def test_missing_status_is_unknown() -> None:
    document = sample("enabled")
    del document["stats"]["inventory"]["status"]
    assert queue(parse(document), "inventory").status == "unknown"


def test_a_queue_not_in_the_seed_is_a_queue_too() -> None:
    document = sample("enabled")
    document["stats"]["emails"] = document["stats"]["product"]
    assert [q.name for q in parse(document).queues] == ["inventory", "product", "emails"]


def test_other_non_negative_integer_fields_are_extra_states() -> None:
    document = sample("enabled")
    entry = document["stats"]["inventory"]
    entry.update(paused=2, prioritized=0, name="inv", weight=-1, ratio=0.5, flag=True)
    inventory = queue(parse(document), "inventory")
    assert inventory.extra_states == (("paused", 2), ("prioritized", 0))
    assert ("paused", 2) in list(inventory.states())


BAD_QUEUE_FIELDS = [
    ("failed", "missing", "stats.inventory.failed"),
    ("failed", None, "stats.inventory.failed"),
    ("failed", -1, "stats.inventory.failed"),
    ("failed", "abc", "stats.inventory.failed"),
    ("failed", 1.5, "stats.inventory.failed"),
    ("failed", 3.0, "stats.inventory.failed"),
    ("failed", True, "stats.inventory.failed"),
    ("waiting", 2**60, "stats.inventory.waiting"),
    ("completed", [1], "stats.inventory.completed"),
    ("recurringJobs", "yes", "stats.inventory.recurringJobs"),
    ("recurringJobs", [], "stats.inventory.recurringJobs"),
]


@pytest.mark.parametrize(("field", "value", "path"), BAD_QUEUE_FIELDS)
def test_malformed_queue_is_skipped_and_named_by_its_path(
    field: str, value: Any, path: str
) -> None:
    document = sample("enabled")
    if value == "missing":
        del document["stats"]["inventory"][field]
    else:
        document["stats"]["inventory"][field] = value
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["product"]
    (error,) = stats.invalid
    assert error.path == path
    assert error.reason == "invalid_payload"
    assert str(error).startswith(f"{path}: ")


#: The largest count a float64 gauge still holds exactly.
LARGEST_EXACT_COUNT = 2**53


def test_a_count_of_2_to_the_53_is_the_largest_accepted() -> None:
    document = sample("enabled")
    entry = document["stats"]["inventory"]
    entry.update(waiting=LARGEST_EXACT_COUNT, paused=LARGEST_EXACT_COUNT)
    entry["recurringJobs"]["count"] = LARGEST_EXACT_COUNT
    stats = parse(document)
    assert stats.invalid == ()
    inventory = queue(stats, "inventory")
    assert inventory.waiting == LARGEST_EXACT_COUNT
    assert inventory.extra_states == (("paused", LARGEST_EXACT_COUNT),)
    assert inventory.recurring is not None
    assert inventory.recurring.count == LARGEST_EXACT_COUNT


@pytest.mark.parametrize("field", ["waiting", "completed"])
def test_a_count_one_past_2_to_the_53_skips_the_queue(field: str) -> None:
    document = sample("enabled")
    document["stats"]["inventory"][field] = LARGEST_EXACT_COUNT + 1
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["product"]
    assert stats.invalid[0].path == f"stats.inventory.{field}"


def test_a_recurring_count_one_past_2_to_the_53_skips_the_queue() -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["recurringJobs"]["count"] = LARGEST_EXACT_COUNT + 1
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["product"]
    assert stats.invalid[0].path == "stats.inventory.recurringJobs.count"


def test_an_extra_field_one_past_2_to_the_53_is_no_state() -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["paused"] = LARGEST_EXACT_COUNT + 1
    assert queue(parse(document), "inventory").extra_states == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", -1),
        ("count", None),
        ("count", "1"),
        ("count", False),
        ("nextRun", "1795772160000"),
        ("nextRun", 1795772160000.5),
        ("nextRun", -5),
        ("nextRun", True),
        ("nextRun", {}),
        ("cron", 5),
        ("cron", ["*/6 * * * *"]),
    ],
)
def test_malformed_recurring_jobs_skip_the_queue(field: str, value: Any) -> None:
    document = sample("enabled")
    document["stats"]["product"]["recurringJobs"][field] = value
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["inventory"]
    assert stats.invalid[0].path == f"stats.product.recurringJobs.{field}"


def test_error_message_says_what_was_expected_and_what_came() -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["failed"] = "abc"
    assert str(parse(document).invalid[0]) == (
        'stats.inventory.failed: expected a non-negative integer, got "abc"'
    )


def test_path_of_an_odd_queue_name_is_quoted() -> None:
    document = sample("enabled")
    document["stats"]['we"ird q'] = {**document["stats"]["inventory"], "failed": None}
    assert parse(document).invalid[0].path == 'stats["we\\"ird q"].failed'


def test_missing_recurring_jobs_means_no_scheduler_information() -> None:
    document = sample("enabled")
    del document["stats"]["inventory"]["recurringJobs"]
    assert queue(parse(document), "inventory").recurring is None


def test_redis_status_is_not_a_queue_even_when_an_object() -> None:
    document = sample("enabled")
    document["stats"]["redisStatus"] = {"waiting": 1}
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["inventory", "product"]
    assert stats.redis_status is None


@pytest.mark.parametrize("value", [None, "true", 1, "yes"])
def test_redis_available_that_is_not_a_boolean_is_not_reported(value: Any) -> None:
    document = sample("enabled")
    document["redisAvailable"] = value
    assert parse(document).redis_available is None


@pytest.mark.parametrize(
    ("body", "reason", "path"),
    [
        (b"<html>502 Bad Gateway</html>", "invalid_json", ""),
        (b"", "invalid_json", ""),
        (b'{"success": true, "stats": {', "invalid_json", ""),
        (b"\xff\xfe{}", "invalid_json", ""),
        (b'\xef\xbb\xbf{"success": true, "stats": {}}', "invalid_json", ""),
        (b'{"success": true, "stats": {"q": {"waiting": NaN}}}', "invalid_json", ""),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", ""),
        (b'{"success": true, "n": ' + b"9" * 5000 + b"}", "invalid_json", ""),
        (b"[]", "invalid_payload", ""),
        (b'"ok"', "invalid_payload", ""),
        (b"null", "invalid_payload", ""),
        (b'{"success": false, "error": "boom"}', "api_failure", "success"),
        (b'{"success": "true", "stats": {}}', "api_failure", "success"),
        (b'{"success": 1, "stats": {}}', "api_failure", "success"),
        (b'{"stats": {}}', "api_failure", "success"),
        (b'{"success": true}', "invalid_payload", "stats"),
        (b'{"success": true, "stats": []}', "invalid_payload", "stats"),
        (b'{"success": true, "stats": null}', "invalid_payload", "stats"),
    ],
)
def test_unusable_answer_raises_parse_error_with_its_reason(
    body: bytes, reason: str, path: str
) -> None:
    with pytest.raises(ParseError) as caught:
        parse_stats(body)
    assert caught.value.reason == reason
    assert caught.value.path == path


def test_empty_queue_name_is_malformed_since_prometheus_would_drop_the_label() -> None:
    document = sample("enabled")
    document["stats"][""] = document["stats"]["inventory"]
    stats = parse(document)
    assert [q.name for q in stats.queues] == ["inventory", "product"]
    assert stats.invalid[0].path == 'stats[""]'


def test_success_of_the_wrong_kind_is_named_by_kind_not_quoted() -> None:
    with pytest.raises(ParseError) as caught:
        parse_stats(b'{"success": "SECRET-BODY-MARKER"}')
    assert str(caught.value) == "success: expected true, got a string"


def test_parse_error_never_quotes_the_body() -> None:
    with pytest.raises(ParseError) as caught:
        parse_stats(b"<html>SECRET-BODY-MARKER</html>")
    assert "SECRET" not in str(caught.value)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=40,
)
QUEUE_FIELD = st.sampled_from(
    ["waiting", "active", "completed", "failed", "delayed", "status", "recurringJobs", "x"]
)
QUEUE = st.dictionaries(QUEUE_FIELD, JSON | st.integers(min_value=0, max_value=10**6))
ANSWER = st.fixed_dictionaries(
    {},
    optional={
        "success": st.just(True) | JSON,
        "stats": st.dictionaries(st.text(), QUEUE | JSON),
        "redisAvailable": JSON,
    },
)


@given(ANSWER)
def test_any_json_document_gives_stats_or_parse_error(document: Any) -> None:
    stats = stats_or_error(json.dumps(document).encode())
    if isinstance(stats, ParseError):
        assert stats.reason in ("invalid_payload", "api_failure")
        return
    assert all(isinstance(q.waiting, int) and q.waiting >= 0 for q in stats.queues)
    assert len(stats.queues) + len(stats.invalid) <= len(document["stats"])


@given(st.binary(max_size=200))
def test_any_bytes_give_stats_or_parse_error(body: bytes) -> None:
    assert isinstance(stats_or_error(body), Stats | ParseError)


# Up to the default max_queue_name_length: longer names are dropped, as test_limits pins.
@given(st.text(max_size=Limits().max_queue_name_length))
def test_any_queue_name_is_kept_exactly(name: str) -> None:
    document = sample("enabled")
    document["stats"] = {name: document["stats"]["inventory"]}
    if name in ("redisStatus", ""):
        assert parse(document).queues == ()
    else:
        assert [q.name for q in parse(document).queues] == [name]


def test_a_memo_reuses_only_the_very_same_body() -> None:
    memo = ParseMemo()
    counts = {"waiting": 1, "active": 0, "completed": 1, "failed": 0, "delayed": 0}

    def parse(entry: dict[str, Any]) -> Stats:
        body = json.dumps({"success": True, "stats": {"q": entry}}).encode()
        return parse_stats(body, memo=memo)

    first = parse(counts)
    assert parse(counts) is first
    # Equal in Python, not in JSON: a true or a 1.0 is no count.
    assert parse(dict(counts, waiting=True)).invalid
    assert parse(dict(counts, waiting=1.0)).invalid
    assert parse(counts).queues[0].waiting == 1
    same = json.dumps({"success": True, "stats": {"q": counts}}).encode()
    assert parse_stats(same, Limits(max_queues=0), memo).dropped_queues == 1
