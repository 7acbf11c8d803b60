"""The Redis source with the real thing: BullMQ 6.7 from npm on Debian's redis-server.

The exporter runs as a process beside a fake stats API; a Node.js driver runs real
BullMQ queues and workers. Every number is read from /metrics as Prometheus reads it
and compared with what the driver made BullMQ do. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
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
from samples import sample
from upstream import (
    Answer,
    ExporterProcess,
    FakeStatsApi,
    clean_environment,
    exporter_command,
    running_exporter,
    wait_until,
)

pytestmark = pytest.mark.integration

PATIENCE = 30.0
#: Distinctive enough that finding it anywhere means it leaked.
PASSWORD = "Redis-S3cret-Kum9uat"
#: The redis: lines of a target that connects as the ACL user `monitoring`.
AS_MONITORING = "      username: monitoring\n      password_file: redis_password\n"


def metrics(exporter: ExporterProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = exporter.get("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(exporter: ExporterProcess, name: str, **labels: str) -> float | None:
    return metrics(exporter).get((name, tuple(sorted(labels.items()))))


def write_config(
    directory: Path, api: FakeStatsApi, redis_server: RedisServer, extra: str = ""
) -> Path:
    return redis_target_config(directory, api.url, redis_server.url, extra)


@pytest.fixture
def api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi() as fake:
        fake.answer(Answer(body=json.dumps(sample("enabled")).encode()))
        yield fake


def following(exporter: ExporterProcess, queue: str) -> None:
    """Wait until the exporter follows `queue`'s stream: its counters are exported."""
    wait_until(
        lambda: value(exporter, "jobstats_queue_jobs_completed_total", queue=queue) is not None,
        PATIENCE,
        f"the exporter to follow {queue}",
    )


def counted(
    exporter: ExporterProcess, queue: str
) -> tuple[float | None, float | None, float | None]:
    samples = metrics(exporter)
    key = (("queue", queue),)
    return (
        samples.get(("jobstats_queue_jobs_completed_total", key)),
        samples.get(("jobstats_queue_jobs_failed_total", key)),
        samples.get(("jobstats_queue_job_retries_total", key)),
    )


def run_jobs(driver: BullmqDriver, queue: str) -> None:
    """12 jobs complete, 7 fail for good, 3 fail twice and then complete: 6 retries.

    With the warm-up job each test adds first, 16 complete.
    """
    retention = {"removeOnComplete": 2, "removeOnFail": 2}
    jobs = [{"name": "ok", "data": {"ms": 5}, "opts": retention} for _ in range(12)]
    jobs += [{"name": "bad", "data": {"ms": 5, "fail": True}, "opts": retention} for _ in range(7)]
    jobs += [
        {
            "name": "flaky",
            "data": {"ms": 5, "failAttempts": 2},
            "opts": {**retention, "attempts": 3},
        }
        for _ in range(3)
    ]
    driver.add_bulk(queue, jobs)
    driver.start_worker(queue, "counter")
    driver.wait_finished(queue, 23)  # the warm-up job too


def test_every_job_is_counted_where_retention_keeps_two(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})  # the queue exists before the exporter
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        run_jobs(driver, "inventory")
        # The warm-up job ran too, once a worker started.
        wait_until(
            lambda: counted(exporter, "inventory") == (16.0, 7.0, 6.0),
            PATIENCE,
            f"16 completed, 7 failed, 6 retries, got {counted(exporter, 'inventory')}",
        )
        view = driver.state("inventory")
        # What BullMQ retains stopped moving at its limit: the counters did not.
        assert (view.counts["completed"], view.counts["failed"]) == (2, 2)
        samples = metrics(exporter)
        assert samples[("jobstats_redis_up", ())] == 1.0
        assert samples[("jobstats_queue_events_missed_total", (("queue", "inventory"),))] == 0.0
        assert samples[("jobstats_up", ())] == 1.0  # the API-based series are there too


def test_job_timings_match_the_durations_the_jobs_took(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("reports")
    driver.add("reports", "first", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "reports")
        driver.add_bulk("reports", [{"name": "slow", "data": {"ms": 300}} for _ in range(4)])
        driver.start_worker("reports", "timer")
        driver.wait_finished("reports", 5)
        run = "jobstats_queue_job_run_seconds"
        wait_until(
            lambda: value(exporter, f"{run}_count", queue="reports", outcome="completed") == 5,
            PATIENCE,
            "five timed jobs: the first started after the exporter followed the queue",
        )
        samples = metrics(exporter)
        labels = (("outcome", "completed"), ("queue", "reports"))
        total = samples[(f"{run}_sum", labels)]
        # Four jobs slept 300 ms and one 1 ms; the worker adds a little.
        assert 4 * 0.3 <= total < 4 * 1.0
        assert samples[(f"{run}_bucket", (("le", "0.25"), *labels))] == 1
        assert samples[(f"{run}_bucket", (("le", "1.0"), *labels))] == 5
        # Jobs 2 to 5 waited for the one worker behind each other: 0.3, 0.6, 0.9 s and so on.
        wait_sum = samples[("jobstats_queue_job_wait_seconds_sum", (("queue", "reports"),))]
        assert wait_sum >= 0.3 + 0.6 + 0.9


def test_oldest_waiting_age_rises_while_no_worker_runs_and_workers_are_counted(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("mail")
    driver.add("mail", "first", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "mail")
        oldest = "jobstats_queue_oldest_waiting_job_age_seconds"
        first = value(exporter, oldest, queue="mail")
        assert first is not None
        assert value(exporter, "jobstats_queue_workers", queue="mail") == 0
        wait_until(
            lambda: (value(exporter, oldest, queue="mail") or 0) >= first + 1,
            PATIENCE,
            "the oldest waiting job's age to rise",
        )
        worker = driver.start_worker("mail", "postman")
        driver.wait_finished("mail", 1)
        assert value(exporter, "jobstats_queue_workers", queue="mail") == 1
        wait_until(
            lambda: value(exporter, oldest, queue="mail") == 0,
            PATIENCE,
            "no waiting job once the worker ran it",
        )
        driver.close_worker(worker)
        assert value(exporter, "jobstats_queue_workers", queue="mail") == 0


def test_two_exporters_give_the_same_numbers_as_one(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    with ExitStack() as stack:
        pair = [
            stack.enter_context(running_exporter(["--config.file", str(config)], tmp_path))
            for _ in range(2)
        ]
        for exporter in pair:
            following(exporter, "inventory")
        run_jobs(driver, "inventory")
        for exporter in pair:
            wait_until(
                lambda exporter=exporter: counted(exporter, "inventory") == (16.0, 7.0, 6.0),
                PATIENCE,
                f"each exporter to count every job, got {counted(exporter, 'inventory')}",
            )


def test_redis_killed_and_restarted_metrics_answer_throughout_and_counting_resumes(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        worker = driver.start_worker("inventory", "survivor")
        driver.wait_finished("inventory", 1)
        wait_until(lambda: counted(exporter, "inventory")[0] == 1, PATIENCE, "the warm-up job")
        driver.close_worker(worker, force=True)
        mark = exporter.stderr_mark()
        redis_server.kill()
        wait_until(
            lambda: value(exporter, "jobstats_redis_up") == 0, PATIENCE, "jobstats_redis_up 0"
        )
        samples = metrics(exporter)
        assert samples[("jobstats_up", ())] == 1.0  # the API is unaffected
        # The counters are the exporter's own: they stay while Redis is away.
        assert samples[("jobstats_queue_jobs_completed_total", (("queue", "inventory"),))] == 1
        redis_server.start()
        wait_until(
            lambda: value(exporter, "jobstats_redis_up") == 1, PATIENCE, "jobstats_redis_up 1"
        )
        # Redis came back empty: the queue is made anew, and its jobs count on.
        driver.open_queue("inventory")
        driver.add_bulk("inventory", [{"name": "after", "data": {"ms": 1}} for _ in range(5)])
        driver.start_worker("inventory", "after-restart")
        driver.wait_finished("inventory", 6)
        wait_until(
            lambda: counted(exporter, "inventory")[0] == 6,
            PATIENCE,
            f"the five jobs after the restart, got {counted(exporter, 'inventory')}",
        )
        log = exporter.stderr_since(mark)
        assert "Traceback" not in log
        assert "redis source unavailable" in log


def test_a_stream_trimmed_behind_the_exporter_s_back_is_counted_as_missed(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("bulk", events_max_len=20)
    driver.add("bulk", "first", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "bulk")
        before = client.xinfo_stream("bull:bulk:events")["entries-added"]
        os.kill(exporter.pid, signal.SIGSTOP)
        try:
            # The exporter's blocked read may already hold the first entry written now:
            # let it be one that counts for nothing, so what it can have read is known.
            client.xadd("bull:bulk:events", {"event": "noop"})
            # 300 jobs write 600 entries while the exporter reads nothing: BullMQ trims
            # the stream to about 20 behind it.
            for _ in range(3):
                driver.add_bulk("bulk", [{"name": "n", "data": {"ms": 1}} for _ in range(100)])
        finally:
            os.kill(exporter.pid, signal.SIGCONT)
        info = client.xinfo_stream("bull:bulk:events")
        # Nothing writes any more: what is left is read, the rest was missed, but for the
        # no-op entry, which the blocked read may have taken before the trim.
        expected = info["entries-added"] - before - info["length"]
        assert expected > 1
        missed = "jobstats_queue_events_missed_total"
        wait_until(
            lambda: value(exporter, missed, queue="bulk") in (expected, expected - 1),
            PATIENCE,
            f"{expected} (or one fewer) missed entries",
        )
    client.close()


def test_a_queue_created_while_the_exporter_runs_is_counted_from_its_first_event(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        # Up once the tailer has looked for queues: what it finds later is new.
        wait_until(lambda: value(exporter, "jobstats_redis_up") == 1, PATIENCE, "redis up")
        driver.open_queue("late")
        driver.add_bulk("late", [{"name": "n", "data": {"ms": 1}} for _ in range(3)])
        driver.start_worker("late", "late-worker")
        driver.wait_finished("late", 3)
        # Prometheus takes a new series' first sample as its start: it must be 0, or
        # increase() would never see these three jobs.
        seen: list[float] = []

        def shown() -> bool:
            completed = counted(exporter, "late")[0]
            if completed is not None:
                seen.append(completed)
            return completed == 3

        wait_until(shown, PATIENCE, f"all three jobs of the new queue, seen {seen}")
        assert seen[0] == 0


def test_queue_names_map_renames_the_label(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory-sync")
    driver.add("inventory-sync", "x", {"ms": 1})
    config = write_config(
        tmp_path, api, redis_server, "      queue_names:\n        inventory-sync: inventory\n"
    )
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        samples = metrics(exporter)
        assert not any(dict(labels).get("queue") == "inventory-sync" for _, labels in samples)


def test_two_queues_never_share_a_label(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    for queue in ("inventory", "inventory-sync"):
        driver.open_queue(queue)
        driver.add(queue, "x", {"ms": 1})
    # inventory-sync is renamed to a name another queue already has.
    config = write_config(
        tmp_path, api, redis_server, "      queue_names:\n        inventory-sync: inventory\n"
    )
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        status, body = exporter.get("/metrics")
        assert status == 200
        text = body.decode()
        assert text.count('jobstats_queue_jobs_completed_total{queue="inventory"}') == 1
        wait_until(lambda: "redis queues left out" in exporter.stderr(), PATIENCE, "the log line")


def wrong_password_config(tmp_path: Path, api: FakeStatsApi, redis_server: RedisServer) -> Path:
    """A target that connects as the ACL user `monitoring` with a password it does not have."""
    acl_user(redis_server, PASSWORD)
    (tmp_path / "redis_password").write_text("not-" + PASSWORD)
    return write_config(tmp_path, api, redis_server, AS_MONITORING)


def test_the_documented_read_only_acl_is_enough_and_nothing_is_written(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    acl_user(redis_server, PASSWORD)
    (tmp_path / "redis_password").write_text(PASSWORD + "\n")
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})
    config = write_config(
        tmp_path,
        api,
        redis_server,
        AS_MONITORING,
    )
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
    admin.execute_command("ACL LOG RESET")
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        run_jobs(driver, "inventory")
        wait_until(
            lambda: counted(exporter, "inventory") == (16.0, 7.0, 6.0),
            PATIENCE,
            "every job counted through the read-only user",
        )
        assert value(exporter, "jobstats_queue_workers", queue="inventory") == 1
        _, page = exporter.get("/")
        _, body = exporter.get("/metrics")
        log = exporter.stderr()
    # Any command the ACL refused (a write, or one the README forgot) is in ACL LOG.
    refused = [entry for entry in admin.execute_command("ACL LOG") or []]
    admin.close()
    assert refused == []
    for text in (page.decode(), body.decode(), log):
        assert PASSWORD not in text


def test_a_wrong_password_is_redis_up_0_with_one_log_line_and_no_password(
    api: FakeStatsApi, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = wrong_password_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        wait_until(
            lambda: "redis source unavailable" in exporter.stderr(),
            PATIENCE,
            "the log line of the refused connection",
        )
        assert value(exporter, "jobstats_redis_up") == 0
        assert value(exporter, "jobstats_up") == 1
        log = exporter.stderr()
    assert PASSWORD not in log
    assert "Traceback" not in log
    assert log.count("redis source unavailable") == 1


def test_without_client_list_the_workers_are_left_out_with_one_log_line(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    acl_user(redis_server, PASSWORD, "-@all +@read +multi +exec +ping")
    (tmp_path / "redis_password").write_text(PASSWORD)
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})
    config = write_config(
        tmp_path,
        api,
        redis_server,
        AS_MONITORING,
    )
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        for _ in range(3):
            samples = metrics(exporter)
        assert samples[("jobstats_redis_up", ())] == 1.0
        assert not any(name == "jobstats_queue_workers" for name, _ in samples)
        assert ("jobstats_queue_oldest_waiting_job_age_seconds", (("queue", "inventory"),)) in (
            samples
        )
        assert exporter.stderr().count("CLIENT LIST refused") == 1


def test_metrics_answer_within_the_deadline_when_redis_hangs(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "warm-up", {"ms": 1})
    config = write_config(tmp_path, api, redis_server)
    with running_exporter(["--config.file", str(config)], tmp_path) as exporter:
        following(exporter, "inventory")
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
        try:
            # The client gives up where Prometheus would: the answer must come before.
            status, body = exporter.get(
                "/metrics", {"X-Prometheus-Scrape-Timeout-Seconds": "3"}, timeout=3
            )
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        assert status == 200
        text = body.decode()
        assert "jobstats_redis_up 0.0" in text
        assert "jobstats_up 1.0" in text


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        exporter_command("check", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )


def test_check_says_what_it_finds_in_the_redis_source(
    api: FakeStatsApi, redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue("inventory")
    driver.add("inventory", "x", {"ms": 1})
    result = check("--api.url", api.url, "--redis.url", redis_server.url)
    assert result.returncode == 0, result.stderr
    assert (
        f"Redis source {redis_server.url}: reachable;"
        " 1 BullMQ queues under prefix 'bull': inventory" in result.stdout
    )


def test_check_fails_in_one_line_when_the_redis_source_cannot_be_read(
    api: FakeStatsApi, redis_server: RedisServer, tmp_path: Path
) -> None:
    config = wrong_password_config(tmp_path, api, redis_server)
    result = check("--config.file", str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"jobstats-exporter check: Redis source {redis_server.url}: unavailable:"
    )
    assert PASSWORD not in result.stderr + result.stdout
