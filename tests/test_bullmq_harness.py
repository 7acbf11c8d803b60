"""The BullMQ harness is the real thing, and BullMQ behaves as the exporter will assume.

Each test runs Debian's redis-server and bullmq 6.7.0 (tests/bullmq) and reads Redis
directly with redis-py, as the exporter will: the event stream, the keys, CLIENT LIST.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from bullmq_stack import (
    BULLMQ_DIR,
    BullmqDriver,
    DriverError,
    RedisServer,
)
from upstream import wait_until

pytestmark = pytest.mark.integration

CAPTURE = Path(__file__).resolve().parents[2] / "shared" / "samples" / "bullmq-redis-capture.json"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield connection
    finally:
        connection.close()


def stream(client: redis.Redis, queue: str, prefix: str = "bull") -> list[dict[str, str]]:
    """Every entry of the queue's event stream, oldest first, as its fields."""
    entries = cast(list[tuple[str, dict[str, str]]], client.xrange(f"{prefix}:{queue}:events"))
    return [fields for _, fields in entries]


def of_job(entries: list[dict[str, str]], job_id: str) -> list[dict[str, str]]:
    return [entry for entry in entries if entry.get("jobId") == job_id]


def client_names(client: redis.Redis) -> list[str]:
    return [entry["name"] for entry in client.client_list() if entry.get("name")]


def test_the_pinned_bullmq_is_the_version_of_the_capture(driver: BullmqDriver) -> None:
    lock = json.loads((BULLMQ_DIR / "package-lock.json").read_text(encoding="utf-8"))
    installed = json.loads(
        (BULLMQ_DIR / "node_modules" / "bullmq" / "package.json").read_text(encoding="utf-8")
    )
    capture = json.loads(CAPTURE.read_text(encoding="utf-8")) if CAPTURE.exists() else None

    assert lock["packages"]["node_modules/bullmq"]["version"] == "6.7.0"
    assert installed["version"] == "6.7.0"
    if capture is not None:
        assert capture["bullmq_version"] == "bullmq:6.7.0"


def test_the_driver_answers_a_bad_command_and_keeps_working(driver: BullmqDriver) -> None:
    driver.send_line("not json")
    assert "not JSON" in driver.wait_answer(None, 10, "a bad line")["error"]
    with pytest.raises(DriverError, match="unknown command"):
        driver.call("no-such-command")
    with pytest.raises(DriverError, match="no worker"):
        driver.close_worker("nobody")

    assert driver.call("ping")["ok"] is True


def test_completed_jobs_beyond_retention_leave_the_count_but_every_event_in_the_stream(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    driver.add_bulk(
        "inventory",
        [{"name": "sync", "data": {"ms": 5}, "opts": {"removeOnComplete": 2}}] * 5,
    )
    driver.start_worker("inventory", concurrency=2)
    assert driver.wait_finished("inventory", 5) == {"completed": 5, "failed": 0, "retried": 0}

    view = driver.state("inventory")
    assert view.counts["completed"] == 2
    assert client.zcard("bull:inventory:completed") == 2
    completed = [e for e in stream(client, "inventory") if e["event"] == "completed"]
    assert len(completed) == 5
    assert {e["prev"] for e in completed} == {"active"}
    assert driver.wait_events("inventory", "completed", 5)["completed"] == 5


def test_a_failed_job_writes_failed_and_retries_exhausted_even_with_one_attempt(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    driver.add_bulk(
        "mail", [{"name": "send", "data": {"fail": True}, "opts": {"removeOnFail": 1}}] * 3
    )
    driver.start_worker("mail")
    assert driver.wait_finished("mail", 3) == {"completed": 0, "failed": 3, "retried": 0}

    assert driver.state("mail").counts["failed"] == 1
    events = [e["event"] for e in stream(client, "mail")]
    assert events.count("failed") == 3
    assert events.count("retries-exhausted") == 3
    exhausted = [e for e in stream(client, "mail") if e["event"] == "retries-exhausted"]
    assert {e["attemptsMade"] for e in exhausted} == {"1"}


def test_a_retried_attempt_goes_back_to_waiting_from_active_and_completes_once(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    job_id = driver.add("inventory", "sync", {"failAttempts": 2}, {"attempts": 3})
    driver.start_worker("inventory")
    assert driver.wait_finished("inventory", 1) == {"completed": 1, "failed": 0, "retried": 2}

    entries = of_job(stream(client, "inventory"), job_id)
    assert [(e["event"], e.get("prev")) for e in entries] == [
        ("added", None),
        ("waiting", None),
        ("active", "waiting"),
        ("waiting", "active"),
        ("active", "waiting"),
        ("waiting", "active"),
        ("active", "waiting"),
        ("completed", "active"),
    ]
    assert driver.job_state("inventory", job_id)["attemptsMade"] == 3
    assert driver.wait_events("inventory", "completed", 1)["retried"] == 2


def test_a_retry_with_backoff_is_delayed_without_prev_then_waiting_from_delayed(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    job_id = driver.add(
        "inventory",
        "sync",
        {"failAttempts": 1},
        {"attempts": 2, "backoff": {"type": "fixed", "delay": 50}},
    )
    driver.start_worker("inventory")
    assert driver.wait_finished("inventory", 1) == {"completed": 1, "failed": 0, "retried": 1}

    entries = of_job(stream(client, "inventory"), job_id)
    # moveToDelayed-11.lua writes no `prev`: only the job's earlier `active` tells a retry
    # from a job added with a delay.
    assert [(e["event"], e.get("prev")) for e in entries] == [
        ("added", None),
        ("waiting", None),
        ("active", "waiting"),
        ("delayed", None),
        ("waiting", "delayed"),
        ("active", "waiting"),
        ("completed", "active"),
    ]
    assert driver.wait_events("inventory", "completed", 1)["retried"] == 1


def test_workers_name_their_connection_by_base64_queue_and_leave_when_closed(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    worker = driver.start_worker("inventory", "job-stats-api:inventory")
    expected = f"bull:{base64.b64encode(b'inventory').decode()}:w:job-stats-api:inventory"
    if CAPTURE.exists():
        capture = json.loads(CAPTURE.read_text(encoding="utf-8"))
        assert expected in capture["worker_client_names"]

    names = client_names(client)
    assert names.count(expected) == 1
    # The driver's QueueEvents names its connection too; getWorkers() does not count it.
    assert "bull:aW52ZW50b3J5:qe" in names
    view = driver.state("inventory")
    assert (view.workers, view.worker_names) == (1, [expected])

    driver.close_worker(worker)
    # BullMQ drops the named (blocking) connection without QUIT: Redis forgets it a little later.
    wait_until(lambda: expected not in client_names(client), 10, f"{expected} to leave")
    assert driver.state("inventory").workers == 0


def test_an_anonymous_worker_is_named_by_the_queue_alone(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    driver.start_worker("product", anonymous=True)
    assert "bull:cHJvZHVjdA==" in client_names(client)
    assert driver.state("product").workers == 1


def test_a_paused_queue_keeps_its_jobs_in_wait(driver: BullmqDriver, client: redis.Redis) -> None:
    driver.pause("product")
    driver.add_bulk("product", [{"name": "manual"}] * 2)
    driver.start_worker("product")

    view = driver.state("product")
    assert view.paused is True
    assert (view.counts["waiting"], view.counts["paused"]) == (2, 0)
    assert client.llen("bull:product:wait") == 2
    assert client.hget("bull:product:meta", "paused") == "1"
    assert "paused" in [e["event"] for e in stream(client, "product")]

    driver.resume("product")
    assert driver.wait_finished("product", 2)["completed"] == 2


def test_a_job_scheduler_keeps_its_next_job_delayed(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    job_id = driver.upsert_scheduler("inventory", "inventory-recurring", pattern="*/6 * * * *")
    assert job_id is not None
    assert job_id.startswith("repeat:inventory-recurring:")

    schedulers = driver.state("inventory").schedulers
    assert [(s["key"], s["pattern"]) for s in schedulers] == [
        ("inventory-recurring", "*/6 * * * *")
    ]
    assert client.zrange("bull:inventory:repeat", 0, -1) == ["inventory-recurring"]
    assert client.zrange("bull:inventory:delayed", 0, -1) == [job_id]

    assert driver.remove_scheduler("inventory", "inventory-recurring") is True
    assert driver.state("inventory").schedulers == []


def test_a_small_events_max_len_trims_the_stream_and_redis_counts_what_was_added(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    driver.open_queue("busy", events_max_len=10)
    driver.add_bulk("busy", [{"name": "tick"}] * 150)
    driver.start_worker("busy", concurrency=10)
    driver.wait_finished("busy", 150)

    assert client.hget("bull:busy:meta", "opts.maxLenEvents") == "10"
    info: dict[str, Any] = client.xinfo_stream("bull:busy:events")
    # MAXLEN ~ trims whole stream nodes (100 entries each by default): fewer remain than
    # were added, but usually more than 10.
    assert info["entries-added"] >= 150 * 4
    assert info["length"] < info["entries-added"]


def test_the_worker_carries_on_after_redis_is_killed_and_restarted(
    driver: BullmqDriver, redis_server: RedisServer, client: redis.Redis
) -> None:
    driver.start_worker("inventory", "job-stats-api:inventory")
    driver.add("inventory", "before")
    driver.wait_finished("inventory", 1)

    port = redis_server.port
    redis_server.restart(kill=True)
    assert redis_server.port == port

    # Redis came back empty; BullMQ reconnects and names its worker connection again.
    wait_until(
        lambda: any(name.endswith(":w:job-stats-api:inventory") for name in client_names(client)),
        30,
        "the worker's connection after the restart",
    )
    driver.add("inventory", "after")
    assert driver.wait_finished("inventory", 2)["completed"] == 2
    assert [e["event"] for e in stream(client, "inventory")].count("completed") == 1


def test_an_obliterated_queue_leaves_no_key_behind(
    driver: BullmqDriver, client: redis.Redis
) -> None:
    driver.add_bulk("gone", [{"name": "manual", "opts": {"delay": 60_000}}] * 3)
    assert client.exists("bull:gone:events", "bull:gone:meta", "bull:gone:delayed") == 3

    driver.obliterate("gone")
    assert sorted(client.scan_iter("bull:gone:*")) == []
