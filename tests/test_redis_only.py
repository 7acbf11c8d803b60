"""A backend without a stats API: the whole card from BullMQ's Redis, with the real thing.

The exporter runs as a process with nothing but a Redis source; a Node.js driver runs
real BullMQ 6.7 queues. What /metrics shows equals what BullMQ's own calls report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from bullmq_stack import (
    BullmqDriver,
    RedisServer,
    acl_user,
    redis_target_config,
)
from upstream import (
    ExporterProcess,
    clean_environment,
    exporter_command,
    running_exporter,
    wait_until,
)

pytestmark = pytest.mark.integration

PATIENCE = 30.0
STATES = ("waiting", "active", "completed", "failed", "delayed", "prioritized")

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(exporter: ExporterProcess) -> Samples:
    status, body = exporter.get("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def queue_counts(samples: Samples, queue: str) -> dict[str, float]:
    return {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "jobstats_queue_jobs" and dict(labels).get("queue") == queue
    }


def status_of(samples: Samples, queue: str) -> str | None:
    for (name, labels), value in samples.items():
        if name == "jobstats_queue_status" and dict(labels).get("queue") == queue and value == 1:
            return dict(labels)["status"]
    return None


def redis_only(redis_server: RedisServer, tmp_path: Path) -> list[str]:
    """The flags of an exporter whose one target has no stats API, only `redis_server`."""
    return ["--config.file", str(redis_target_config(tmp_path, None, redis_server.url))]


def bullmq_counts(driver: BullmqDriver, queue: str) -> dict[str, float]:
    counts = driver.state(queue).counts
    return {state: float(counts[state]) for state in STATES}


def test_the_card_equals_what_bullmq_reports(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    retention = {"removeOnComplete": 50, "removeOnFail": 50}
    driver.add_bulk(
        "inventory",
        [{"name": "ok", "data": {"ms": 1}, "opts": retention} for _ in range(4)]
        + [{"name": "bad", "data": {"ms": 1, "fail": True}, "opts": retention} for _ in range(2)],
    )
    worker = driver.start_worker("inventory", "card")
    driver.wait_finished("inventory", 6)
    driver.close_worker(worker)
    driver.add("inventory", "later", {"ms": 1}, {"delay": 600_000})
    driver.add("inventory", "waits", {"ms": 1})
    driver.add("inventory", "urgent", {"ms": 1}, {"priority": 5})
    driver.upsert_scheduler("inventory", "inventory-recurring", pattern="*/6 * * * *")
    with running_exporter(redis_only(redis_server, tmp_path), tmp_path) as exporter:
        wait_until(
            lambda: metrics(exporter).get(("jobstats_up", ())) == 1,
            PATIENCE,
            "a scrape with the card",
        )
        wait_until(
            lambda: queue_counts(metrics(exporter), "inventory") != {},
            PATIENCE,
            "the inventory queue",
        )
        samples = metrics(exporter)
        expected = bullmq_counts(driver, "inventory")
        got = queue_counts(samples, "inventory")
        assert {state: got.get(state) for state in STATES} == expected
        # The worker has closed: BullMQ says no worker, and so does the card.
        assert driver.state("inventory").workers == 0
        assert status_of(samples, "inventory") == "stopped"
        schedulers = driver.state("inventory").schedulers
        assert samples[("jobstats_queue_recurring_jobs", (("queue", "inventory"),))] == len(
            schedulers
        )
        assert samples[
            ("jobstats_queue_next_run_timestamp_seconds", (("queue", "inventory"),))
        ] == (min(s["next"] for s in schedulers) / 1000)
        info = [
            dict(labels)
            for (name, labels), _ in samples.items()
            if name == "jobstats_queue_recurring_info"
        ]
        assert info[0]["cron"] == "*/6 * * * *"
        assert samples[("jobstats_redis_available", ())] == 1
        assert samples[("jobstats_redis_enabled", ())] == 1
        # The exact counters of the event stream are there too.
        assert ("jobstats_queue_jobs_completed_total", (("queue", "inventory"),)) in samples


def test_a_paused_queue_and_an_active_one(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    for queue in ("mail", "reports"):
        driver.open_queue(queue)
        driver.add(queue, "x", {"ms": 1})
    driver.start_worker("mail", "postman")
    driver.start_worker("reports", "clerk")
    driver.pause("reports")
    with running_exporter(redis_only(redis_server, tmp_path), tmp_path) as exporter:
        wait_until(
            lambda: status_of(metrics(exporter), "reports") is not None,
            PATIENCE,
            "the queues' status",
        )
        samples = metrics(exporter)
        assert driver.state("reports").paused
        assert status_of(samples, "reports") == "paused"
        assert status_of(samples, "mail") == "active"


def test_a_queue_created_while_the_exporter_runs_appears(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    with running_exporter(redis_only(redis_server, tmp_path), tmp_path) as exporter:
        wait_until(lambda: metrics(exporter).get(("jobstats_up", ())) == 1, PATIENCE, "up")
        assert metrics(exporter)[("jobstats_queues", ())] == 0
        driver.open_queue("fresh")
        driver.add("fresh", "x", {"ms": 1})
        wait_until(
            lambda: queue_counts(metrics(exporter), "fresh").get("waiting") == 1,
            PATIENCE,
            "the new queue with its waiting job",
        )


def test_redis_down_is_jobstats_up_0_for_connect_and_metrics_still_answer(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with running_exporter(redis_only(redis_server, tmp_path), tmp_path) as exporter:
        wait_until(lambda: metrics(exporter).get(("jobstats_up", ())) == 1, PATIENCE, "up")
        redis_server.stop()
        wait_until(
            lambda: metrics(exporter).get(("jobstats_up", ())) == 0,
            PATIENCE,
            "jobstats_up 0",
        )
        samples = metrics(exporter)
        assert samples[("jobstats_scrape_errors_total", (("reason", "connect"),))] >= 1
        assert samples[("jobstats_redis_up", ())] == 0
        assert "Traceback" not in exporter.stderr()


def test_the_command_line_s_redis_url_alone_is_a_redis_only_target(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "x", {"ms": 1})
    with running_exporter(["--redis.url", redis_server.url], tmp_path) as exporter:
        wait_until(
            lambda: queue_counts(metrics(exporter), "inventory").get("waiting") == 1,
            PATIENCE,
            "the card from Redis",
        )
    result = subprocess.run(
        exporter_command("check", "--redis.url", redis_server.url),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "inventory" in result.stdout
    assert redis_server.url.rstrip("/0") in result.stdout or "redis://127.0.0.1" in result.stdout


def test_the_documented_read_only_acl_is_enough_for_the_card(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    password = "Card-S3cret-Kum9uat"
    acl_user(redis_server, password)  # the ACL of the README, section Permissions
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    admin.execute_command("ACL LOG RESET")
    driver.open_queue("inventory")
    driver.add("inventory", "x", {"ms": 1})
    driver.upsert_scheduler("inventory", "nightly", pattern="0 3 * * *")
    (tmp_path / "pw").write_text(password)
    config = redis_target_config(
        tmp_path, None, redis_server.url, "      username: monitoring\n      password_file: pw\n"
    )
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        wait_until(
            lambda: queue_counts(metrics(exporter), "inventory").get("delayed") == 1,
            PATIENCE,
            "the card read as the read-only user",
        )
        samples = metrics(exporter)
        assert samples[("jobstats_queue_recurring_jobs", (("queue", "inventory"),))] == 1
        log = exporter.stderr()
    assert admin.execute_command("ACL LOG") == []
    admin.close()
    assert password not in log
