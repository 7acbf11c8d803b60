"""The simulated stats API: deterministic, realistic enough to demo, and served over HTTP."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.demo import STATS_PATH, QueueSpec, Simulation, make_simulator_server
from exporter.model import parse_stats

START = 1_800_000_000.0  # a whole hour in UTC, so cron fire times are easy to read
HOUR = 3600
SAMPLES = Path(__file__).parent / "fixtures" / "samples"
COUNTS = ("waiting", "active", "completed", "failed", "delayed")


def run(simulation: Simulation, seconds: int, step: int = 1) -> Iterator[tuple[float, Any]]:
    """Every answer from START + step to START + seconds, with the time asked."""
    for offset in range(step, seconds + 1, step):
        now = START + offset
        yield now, simulation.answer(now)


def queues(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: entry for name, entry in document["stats"].items() if isinstance(entry, dict)}


@pytest.fixture(scope="module")
def three_hours() -> list[tuple[float, Any]]:
    """Seed 0's answers each second over three simulated hours, shared by the behaviour tests."""
    return list(run(Simulation(0, start=START), 3 * HOUR))


def test_same_seed_gives_same_answers_however_time_is_stepped() -> None:
    one_by_one = Simulation(7, start=START)
    answers = [document for _, document in run(one_by_one, 600)]
    in_strides = Simulation(7, start=START)
    assert [document for _, document in run(in_strides, 600, step=60)] == answers[59::60]


def test_different_seeds_give_different_answers() -> None:
    first = [document for _, document in run(Simulation(1, start=START), HOUR, step=60)]
    second = [document for _, document in run(Simulation(2, start=START), HOUR, step=60)]
    assert first != second


def test_default_queues_are_inventory_product_and_emails_with_their_crons() -> None:
    document = Simulation(0, start=START).answer(START)
    crons = {name: entry["recurringJobs"]["cron"] for name, entry in queues(document).items()}
    assert crons == {
        "inventory": "*/6 * * * *",
        "product": "0 */3 * * * *",
        "emails": "*/30 * * * * *",
    }
    assert document["stats"]["redisStatus"] == "enabled"
    assert document["redisAvailable"] is True


def test_every_default_queue_completes_and_fails_jobs_within_an_hour(
    three_hours: list[tuple[float, Any]],
) -> None:
    first, last = queues(three_hours[0][1]), queues(three_hours[HOUR - 1][1])
    for name in ("inventory", "product", "emails"):
        assert last[name]["completed"] > first[name]["completed"], name
        assert last[name]["failed"] > first[name]["failed"], name


def test_counts_are_always_non_negative_integers(three_hours: list[tuple[float, Any]]) -> None:
    for _, document in three_hours:
        for entry in queues(document).values():
            for state in COUNTS:
                assert type(entry[state]) is int
                assert entry[state] >= 0


def test_retained_counts_never_exceed_remove_on_complete_and_remove_on_fail(
    three_hours: list[tuple[float, Any]],
) -> None:
    emails = [queues(document)["emails"] for _, document in three_hours]
    assert max(entry["completed"] for entry in emails) == 100
    assert all(entry["failed"] <= 50 for entry in emails)


def test_completed_count_drops_when_retention_trims(
    three_hours: list[tuple[float, Any]],
) -> None:
    drops = set()
    for (_, before), (_, after) in itertools.pairwise(three_hours):
        for name, entry in queues(after).items():
            if entry["completed"] < queues(before)[name]["completed"]:
                drops.add(name)
    assert drops == {"inventory", "product", "emails"}


def test_a_scheduler_keeps_one_delayed_job_at_all_times(
    three_hours: list[tuple[float, Any]],
) -> None:
    for _, document in three_hours:
        assert all(entry["delayed"] >= 1 for entry in queues(document).values())


def test_next_run_follows_the_cron_while_the_queue_is_active(
    three_hours: list[tuple[float, Any]],
) -> None:
    seen: dict[str, set[int]] = {"inventory": set(), "product": set(), "emails": set()}
    for now, document in three_hours:
        for name, entry in queues(document).items():
            next_run = entry["recurringJobs"]["nextRun"]
            seen[name].add(next_run)
            if entry["status"] == "active":
                # Fires happen on whole ticks, so nextRun lags `now` by under a second at most.
                assert next_run > (now - 1) * 1000, (name, now)
    ms = 1000
    assert {run % (360 * ms) for run in seen["inventory"]} == {0}
    assert {run % (180 * ms) for run in seen["product"]} == {0}
    assert {run % (30 * ms) for run in seen["emails"]} == {0}
    # Every fire time in the first hour shows up: 10 every 6 min, 20 every 3 min, 120 every 30 s.
    first_hour = range(int(START) * ms, int(START + HOUR) * ms + 1)
    assert len([run for run in seen["inventory"] if run in first_hour]) == 10
    assert len([run for run in seen["product"] if run in first_hour]) == 20
    assert len([run for run in seen["emails"] if run in first_hour]) >= 110


def test_queues_are_paused_and_stopped_now_and_then_but_mostly_active(
    three_hours: list[tuple[float, Any]],
) -> None:
    statuses = [
        entry["status"] for _, document in three_hours for entry in queues(document).values()
    ]
    assert {"active", "paused", "stopped"} == set(statuses)
    assert statuses.count("active") > 0.9 * len(statuses)
    for _, document in three_hours:
        troubled = [e for e in queues(document).values() if e["status"] != "active"]
        assert len(troubled) <= 1


def test_a_paused_queue_still_receives_jobs_but_starts_none(
    three_hours: list[tuple[float, Any]],
) -> None:
    grew = False
    for (_, before), (_, after) in itertools.pairwise(three_hours):
        for name, entry in queues(after).items():
            previous = queues(before)[name]
            if entry["status"] == previous["status"] == "paused":
                assert entry["active"] <= previous["active"]
                assert entry["waiting"] >= previous["waiting"]
                grew = grew or entry["waiting"] > previous["waiting"]
    assert grew


def test_a_stopped_queue_runs_nothing_and_its_next_run_falls_into_the_past(
    three_hours: list[tuple[float, Any]],
) -> None:
    overdue = 0
    for now, document in three_hours:
        for entry in queues(document).values():
            if entry["status"] == "stopped":
                assert entry["active"] == 0
                overdue += entry["recurringJobs"]["nextRun"] < now * 1000
    assert overdue > 60


def test_answers_pass_the_exporters_parser_with_no_invalid_queue(
    three_hours: list[tuple[float, Any]],
) -> None:
    for _, document in three_hours[::300]:
        stats = parse_stats(json.dumps(document).encode())
        assert stats.invalid == ()
        assert [queue.name for queue in stats.queues] == ["inventory", "product", "emails"]
        assert stats.redis_available is True
        assert stats.redis_enabled


def test_redis_down_answer_is_the_real_backends() -> None:
    simulation = Simulation(0, start=START)
    simulation.redis_down = True
    expected = json.loads((SAMPLES / "redis-down.json").read_text())
    assert simulation.answer(START + 60) == expected
    assert parse_stats(json.dumps(expected).encode()).queues == ()


def test_a_queue_without_scheduler_reports_none() -> None:
    simulation = Simulation(0, start=START, queues=[QueueSpec("reports")])
    entry = queues(simulation.answer(START + 120))["reports"]
    assert entry["recurringJobs"] == {"count": 0, "nextRun": None, "cron": None}


def test_a_time_jump_of_a_day_fires_an_overdue_schedule_once() -> None:
    simulation = Simulation(0, start=START)
    document = simulation.answer(START + 24 * HOUR)
    for entry in queues(document).values():
        assert entry["recurringJobs"]["nextRun"] > (START + 24 * HOUR - 1) * 1000


def test_time_going_backwards_changes_nothing() -> None:
    simulation = Simulation(0, start=START)
    later = simulation.answer(START + 600)
    assert simulation.answer(START + 10) == later


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([QueueSpec("a"), QueueSpec("a")], "unique"),
        ([QueueSpec("redisStatus")], "redisStatus"),
        ([QueueSpec("a", cron="every minute")], "invalid cron pattern 'every minute'"),
    ],
)
def test_bad_queue_specs_are_refused(specs: list[QueueSpec], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Simulation(0, start=START, queues=specs)


def test_server_answers_the_stats_over_keep_alive_and_404_elsewhere() -> None:
    times = iter([START + 60, START + 120])
    server = make_simulator_server(
        ("127.0.0.1", 0), Simulation(0, start=START), clock=lambda: next(times)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), int(port), timeout=10)
    try:
        expected = Simulation(0, start=START)
        for now in (START + 60, START + 120):
            connection.request("GET", STATS_PATH)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200
            assert response.getheader("Content-Type") == "application/json"
            assert response.will_close is False
            assert json.loads(body) == expected.answer(now)
        socket_used = connection.sock
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        response.read()
        assert response.status == 404
        assert connection.sock is socket_used  # one connection served all three requests
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
