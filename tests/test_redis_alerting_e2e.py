"""End to end from a real BullMQ to a webhook: the Redis source under the shipped rules.

A real BullMQ on Debian's redis-server fails jobs; the exporter reads its event streams
and a fake stats API that shows what BullMQ retains, as a real backend does; a real
Prometheus scrapes it with test copies of the shipped rules (alerting_stack), and a real
Alertmanager delivers to a sink. Everything listens on 127.0.0.1; every wait polls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerting_stack import (
    WINDOW_DIVISOR,
    ServiceProcess,
    WebhookSink,
    duration_seconds,
    poll,
    prometheus_alerts,
    prometheus_query,
    require_tool,
    running_alertmanager,
    running_prometheus,
    write_alertmanager_config,
    write_prometheus_config,
)
from bullmq_stack import (
    BullmqDriver,
    RedisServer,
    redis_target_config,
)
from upstream import HOST, Answer, ExporterProcess, FakeStatsApi, free_port, running_exporter

pytestmark = pytest.mark.integration

#: How long a test waits for one step of the stack (a scrape, an evaluation, a notification).
PATIENCE = 30.0
#: The window of queue:jobstats_failed_jobs:new10m in the test copy of the rules.
WINDOW = duration_seconds("10m") / WINDOW_DIVISOR
QUEUE = "inventory"
#: BullMQ keeps the last 5 failed jobs of the queue: its retained failed count stops at 5.
RETENTION = {"removeOnComplete": 5, "removeOnFail": 5}
NEW_FAILED = "queue:jobstats_failed_jobs:new10m"
#: increase() extrapolates past the last sample by up to a scrape interval: 1s on top of
#: the seconds a series has been sampled in its window. Once those are ten or more, a count
#: stays below this factor of the true one; a count of anything twice never does.
EXTRAPOLATION = 1.1


# --- The stack ----------------------------------------------------------------------------


def answer_from(counts: dict[str, int]) -> Answer:
    """The stats API's answer for QUEUE with the counts BullMQ reports, as the backend does."""
    queue: dict[str, Any] = {
        state: counts[state] for state in ("waiting", "active", "completed", "failed", "delayed")
    }
    queue["status"] = "active"
    document = {
        "success": True,
        "stats": {QUEUE: queue, "redisStatus": "enabled"},
        "redisAvailable": True,
        "message": "Background jobs are enabled with Redis",
    }
    return Answer(body=json.dumps(document).encode("utf-8"))


def write_exporter_config(directory: Path, api: FakeStatsApi, redis_server: RedisServer) -> Path:
    return redis_target_config(directory, api.url, redis_server.url, timeout="1s")


def scrape_every(config: Path, exporters: Sequence[ExporterProcess]) -> None:
    """The copy's job "jobstats" scrapes every one of `exporters`: an HA pair is one job."""
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    [job] = [scrape for scrape in document["scrape_configs"] if scrape["job_name"] == "jobstats"]
    job["static_configs"] = [{"targets": [f"{HOST}:{e.port}" for e in exporters]}]
    config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Stack:
    prometheus: ServiceProcess
    sink: WebhookSink
    rules: Path

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """`promql` now, by the labels of each sample (its metric name left out)."""
        return {
            tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__")): float(
                s["value"][1]
            )
            for s in prometheus_query(self.prometheus.port, promql)
        }

    def new_failed(self) -> list[tuple[dict[str, str], float]]:
        """The samples of queue:jobstats_failed_jobs:new10m for QUEUE, with their labels."""
        return [
            (dict(labels), value)
            for labels, value in self.query(f'{NEW_FAILED}{{queue="{QUEUE}"}}').items()
        ]

    def alerts(self, alertname: str) -> list[dict[str, Any]]:
        """Prometheus' pending and firing alerts named `alertname`."""
        return [
            a
            for a in prometheus_alerts(self.prometheus.port)
            if a["labels"]["alertname"] == alertname
        ]

    def rule_expr(self, record: str) -> str:
        """The expression of the recording rule `record` in the test copy of the rules."""
        document = yaml.safe_load(self.rules.read_text(encoding="utf-8"))
        [expr] = [
            rule["expr"]
            for group in document["groups"]
            for rule in group["rules"]
            if rule.get("record") == record
        ]
        return str(expr)


@contextmanager
def alerting(directory: Path, exporters: Sequence[ExporterProcess]) -> Iterator[Stack]:
    """Alertmanager to a sink, and Prometheus scraping `exporters` as the job "jobstats"."""
    require_tool("prometheus")
    require_tool("prometheus-alertmanager")
    with (
        WebhookSink() as sink,
        running_alertmanager(
            write_alertmanager_config(directory / "alertmanager", sink_url=sink.url),
            directory / "alertmanager",
        ) as alertmanager,
    ):
        port = free_port()
        config = write_prometheus_config(
            directory / "prometheus",
            exporter_port=exporters[0].port,
            alertmanager_port=alertmanager.port,
            prometheus_port=port,
        )
        scrape_every(config, exporters)
        [rules] = yaml.safe_load(config.read_text(encoding="utf-8"))["rule_files"]
        with running_prometheus(config, directory / "prometheus", port) as prometheus:
            yield Stack(prometheus, sink, Path(rules))
    assert sink.errors == []


def fail_jobs(driver: BullmqDriver, count: int, finished_before: int) -> dict[str, int]:
    """`count` jobs of QUEUE fail for good under RETENTION; BullMQ's counts afterwards."""
    failing = {"name": "bad", "data": {"ms": 1, "fail": True}, "opts": RETENTION}
    driver.add_bulk(QUEUE, [failing] * count)
    driver.wait_finished(QUEUE, finished_before + count)
    return driver.state(QUEUE).counts


def retained_half(stack: Stack) -> str:
    """The retained-count half of the copy's new10m rule, for queues with counters too.

    What the rules alone would read if the exporter had no event counters.
    """
    parts = [p for p in stack.rule_expr(NEW_FAILED).split("\nor\n") if '"retained"' in p]
    assert len(parts) == 1, stack.rule_expr(NEW_FAILED)
    unless = re.compile(r"\s*unless on \(job, instance, queue\) jobstats_queue_jobs_failed_total")
    expr, removed = unless.subn("", parts[0])
    assert removed == 1, parts[0]
    return expr


def counted_once(stack: Stack, failures: int) -> tuple[dict[str, str], float]:
    """The one new10m sample of QUEUE once it shows `failures`, up to EXTRAPOLATION.

    Right after a burst the counter's series may be seconds old and increase() adds up to
    half as much again; that margin shrinks as the series ages, so the count settles.
    """
    [(labels, value)] = poll(
        stack.new_failed,
        lambda found: len(found) == 1 and failures <= found[0][1] < failures * EXTRAPOLATION,
        WINDOW,
        f"{NEW_FAILED} to count {failures} failures, once",
    )
    return labels, value


def notifications_since(stack: Stack, mark: int) -> list[dict[str, Any]]:
    """Every alert in the webhook notifications after the first `mark` ones."""
    return [a for n in stack.sink.notifications()[mark:] for a in n.alerts]


# --- Tests -----------------------------------------------------------------------------


def test_failures_at_the_retention_limit_fire_the_failed_jobs_alert_from_the_events(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue(QUEUE)
    driver.add(QUEUE, "warm-up", {"ms": 1})  # the queue exists before the exporter starts
    with ExitStack() as stack_:
        api = stack_.enter_context(FakeStatsApi(answer_from(driver.state(QUEUE).counts)))
        config = write_exporter_config(tmp_path, api, redis_server)
        exporter = stack_.enter_context(running_exporter(["--config.file", str(config)], tmp_path))
        stack = stack_.enter_context(alerting(tmp_path, [exporter]))
        instance = f"{HOST}:{exporter.port}"
        events = {"job": "jobstats", "instance": instance, "queue": QUEUE, "source": "events"}

        # increase() needs two samples of the counter before the first failure.
        poll(
            stack.new_failed,
            lambda found: found == [(events, 0.0)],
            PATIENCE,
            f"Prometheus to record no new failed jobs of {QUEUE} from the events",
        )

        # Five failures: the retained count rises to the limit, the backend shows it.
        driver.start_worker(QUEUE, "failing")
        counts = fail_jobs(driver, 5, finished_before=1)  # the warm-up job ran too
        assert counts["failed"] == 5
        served = answer_from(counts)
        api.answer(served)
        poll(
            lambda: stack.alerts("JobStatsQueueFailedJobs"),
            lambda found: any(a["state"] == "firing" for a in found),
            PATIENCE,
            "JobStatsQueueFailedJobs to fire for the first five failures",
        )
        # Then the window passes them by: every count of new failures is back to 0.
        retained = retained_half(stack)
        poll(
            lambda: (
                stack.alerts("JobStatsQueueFailedJobs"),
                stack.new_failed(),
                stack.query(retained),
            ),
            lambda found: (
                found[0] == []
                and [value for _, value in found[1]] == [0.0]
                and list(found[2].values()) == [0.0]
            ),
            WINDOW + PATIENCE,
            "the first alert to resolve and the window to pass the first failures by",
        )
        stack.sink.wait_for_alert(
            "JobStatsQueueFailedJobs", PATIENCE, status="resolved", queue=QUEUE
        )
        mark = len(stack.sink.notifications())

        # Twenty more: BullMQ keeps the last five, so the backend's answer does not move.
        counts = fail_jobs(driver, 20, finished_before=6)
        assert counts["failed"] == 5
        assert answer_from(counts) == served

        # Not 0 as from the retained count; not 25, the first five again.
        labels, _ = counted_once(stack, 20)
        assert labels == events
        # What the retained-count rule would have said of the same data: nothing at all.
        assert stack.query(retained) == {
            tuple(sorted({**events, "source": "retained"}.items())): 0.0
        }
        assert stack.query(
            f'max_over_time(jobstats_queue_jobs{{queue="{QUEUE}", state="failed"}}[{WINDOW:g}s])'
            f' - min_over_time(jobstats_queue_jobs{{queue="{QUEUE}", state="failed"}}[{WINDOW:g}s])'
        ) == {
            (
                ("instance", instance),
                ("job", "jobstats"),
                ("queue", QUEUE),
                ("state", "failed"),
            ): 0.0
        }

        [alert] = poll(
            lambda: stack.alerts("JobStatsQueueFailedJobs"),
            lambda found: any(a["state"] == "firing" for a in found),
            PATIENCE,
            "JobStatsQueueFailedJobs to fire again for the twenty failures",
        )
        assert {k: alert["labels"][k] for k in events} == events
        delivered = poll(
            lambda: [
                a
                for a in notifications_since(stack, mark)
                if a["labels"]["alertname"] == "JobStatsQueueFailedJobs" and a["status"] == "firing"
            ],
            bool,
            PATIENCE,
            "the webhook notification of the second alert",
        )
        assert {k: delivered[0]["labels"][k] for k in events} == events
        assert "counted from BullMQ's event stream" in delivered[0]["annotations"]["description"]
    assert "Traceback" not in exporter.stderr()


def test_an_ha_pair_on_one_redis_is_counted_once_and_pages_once_per_queue(
    redis_server: RedisServer, driver: BullmqDriver, tmp_path: Path
) -> None:
    driver.open_queue(QUEUE)
    driver.add(QUEUE, "warm-up", {"ms": 1})
    with ExitStack() as stack_:
        api = stack_.enter_context(FakeStatsApi(answer_from(driver.state(QUEUE).counts)))
        config = write_exporter_config(tmp_path, api, redis_server)
        # Started one after the other: the first has counted longest, the rules read it.
        first, second = (
            stack_.enter_context(running_exporter(["--config.file", str(config)], tmp_path))
            for _ in range(2)
        )
        stack = stack_.enter_context(alerting(tmp_path, [first, second]))
        older = f"{HOST}:{first.port}"
        events = {"job": "jobstats", "instance": older, "queue": QUEUE, "source": "events"}
        counters = f'jobstats_queue_jobs_failed_total{{queue="{QUEUE}"}}'
        poll(
            lambda: (len(stack.query(counters)), stack.new_failed()),
            lambda found: found == (2, [(events, 0.0)]),
            PATIENCE,
            "both exporters' counters in Prometheus, and the older one's read",
        )
        starts = stack.query("process_start_time_seconds")
        assert (
            starts[(("instance", older), ("job", "jobstats"))]
            < (starts[(("instance", f"{HOST}:{second.port}"), ("job", "jobstats"))])
        )

        driver.start_worker(QUEUE, "failing")
        counts = fail_jobs(driver, 6, finished_before=1)
        api.answer(answer_from(counts))
        # Each exporter counts every failure: the rules must not add them up.
        poll(
            lambda: stack.query(counters),
            lambda found: list(found.values()) == [6.0, 6.0],
            PATIENCE,
            "both exporters to count the six failures",
        )
        labels, _ = counted_once(stack, 6)
        assert labels == events
        # What a dashboard sums per queue: six, not twelve.
        [total] = stack.query(f'sum by (job, queue) ({NEW_FAILED}{{queue="{QUEUE}"}})').values()
        assert 6 <= total < 6 * EXTRAPOLATION

        # Prometheus evaluates both exporters' series together: a second alert of the queue
        # would be pending or firing beside the first.
        found = poll(
            lambda: stack.alerts("JobStatsQueueFailedJobs"),
            lambda found: any(a["state"] == "firing" for a in found),
            PATIENCE,
            "JobStatsQueueFailedJobs to fire",
        )
        assert [{k: a["labels"][k] for k in events} for a in found] == [events]
        _, alert = stack.sink.wait_for_alert("JobStatsQueueFailedJobs", PATIENCE, queue=QUEUE)
        assert {k: alert["labels"][k] for k in events} == events
        paged = {
            a["labels"]["instance"]
            for n in stack.sink.notifications()
            for a in n.alerts
            if a["labels"]["alertname"] == "JobStatsQueueFailedJobs"
        }
        assert paged == {older}
    for exporter in (first, second):
        assert "Traceback" not in exporter.stderr()


def test_redis_source_down_fires_while_redis_is_stopped_and_resolves_after_it_starts(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with ExitStack() as stack_:
        counts = {"waiting": 0, "active": 0, "completed": 0, "failed": 0, "delayed": 0}
        api = stack_.enter_context(FakeStatsApi(answer_from(counts)))
        config = write_exporter_config(tmp_path, api, redis_server)
        exporter = stack_.enter_context(running_exporter(["--config.file", str(config)], tmp_path))
        stack = stack_.enter_context(alerting(tmp_path, [exporter]))
        instance = f"{HOST}:{exporter.port}"
        redis_up = {(("instance", instance), ("job", "jobstats")): 1.0}
        poll(
            lambda: stack.query("jobstats_redis_up"),
            lambda found: found == redis_up,
            PATIENCE,
            "Prometheus to see the exporter's Redis up",
        )
        assert stack.alerts("JobStatsRedisSourceDown") == []

        redis_server.stop()
        [alert] = poll(
            lambda: stack.alerts("JobStatsRedisSourceDown"),
            lambda found: [a["state"] for a in found] == ["firing"],
            PATIENCE,
            "JobStatsRedisSourceDown to fire",
        )
        assert alert["labels"]["instance"] == instance
        assert alert["labels"]["severity"] == "warning"
        stack.sink.wait_for_alert("JobStatsRedisSourceDown", PATIENCE, instance=instance)
        # The API is another path: it still answers, and nothing says it does not.
        assert stack.query("jobstats_up") == {(("instance", instance), ("job", "jobstats")): 1.0}

        redis_server.start()
        poll(
            lambda: (stack.query("jobstats_redis_up"), stack.alerts("JobStatsRedisSourceDown")),
            lambda found: found == (redis_up, []),
            PATIENCE,
            "jobstats_redis_up 1 and JobStatsRedisSourceDown resolved",
        )
        stack.sink.wait_for_alert(
            "JobStatsRedisSourceDown", PATIENCE, status="resolved", instance=instance
        )
    assert "Traceback" not in exporter.stderr()
