"""read_stats against the real BullMQ: the card read from Redis equals BullMQ's own view.

Each test runs Debian's redis-server and bullmq 6.7.0 (tests/bullmq), brings queues to a
state that holds still, then compares `read_stats` with the driver's `state()`
(getJobCounts, isPaused, getWorkers, getJobSchedulers) read at the same moment.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest
import redis
from redis.asyncio import Redis

from exporter.bullmq import Queues, client_names, discover_queues, read_stats, workers_per_queue
from exporter.model import QueueStats, RecurringJobs, Stats

from alerting_stack import require_tool
from bullmq_stack import (
    BULLMQ_DIR,
    BullmqDriver,
    QueueView,
    RedisServer,
)
from upstream import HOST, wait_until

pytestmark = pytest.mark.integration

#: Long enough that a job stays active for the whole test; the worker is closed by force.
SLOW_JOB_MS = 60_000


@pytest.fixture
def sync_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield connection
    finally:
        connection.close()


def read(url: str, prefix: str = "bull") -> Stats:
    """What the exporter reads: discovered queues, workers from CLIENT LIST, then read_stats."""

    async def main() -> Stats:
        client = Redis.from_url(url, decode_responses=True)
        try:
            names = await discover_queues(client, prefix)
            queues = Queues(prefix, {name: name for name in names})
            workers = workers_per_queue(await client_names(client), queues)
            return await read_stats(client, queues, workers)
        finally:
            await client.aclose()

    return asyncio.run(main())


def as_bullmq_reports(queue: str, view: QueueView) -> QueueStats:
    """The card BullMQ's own calls give, in the exporter's shape."""
    counts = view.counts
    status = "paused" if view.paused else ("stopped" if view.workers == 0 else "active")
    # The driver asks getJobSchedulers(0, -1, asc=true): the soonest comes first.
    soonest = view.schedulers[0] if view.schedulers else {}
    return QueueStats(
        name=queue,
        waiting=counts["waiting"],
        active=counts["active"],
        completed=counts["completed"],
        failed=counts["failed"],
        delayed=counts["delayed"],
        extra_states=(
            ("prioritized", counts["prioritized"]),
            ("waiting-children", counts["waiting-children"]),
            ("paused", counts["paused"]),
        ),
        status=status,
        status_text=status,
        recurring=RecurringJobs(
            count=len(view.schedulers),
            next_run_ms=soonest.get("next"),
            cron=soonest.get("pattern"),
        ),
    )


def by_name(stats: Stats) -> dict[str, QueueStats]:
    return {queue.name: queue for queue in stats.queues}


def assert_equal_to_bullmq(driver: BullmqDriver, url: str, queues: list[str]) -> Stats:
    """Every queue read twice around BullMQ's view, equal all three times: nothing moved."""
    before = read(url)
    views = {queue: driver.state(queue) for queue in queues}
    after = read(url)
    assert (before.invalid, after.invalid) == ((), ())
    assert before == after, "the queues moved while being compared: not quiescent"
    read_queues = by_name(after)
    for queue in queues:
        assert read_queues[queue] == as_bullmq_reports(queue, views[queue]), queue
    return after


def test_each_state_equals_what_bullmq_reports(
    driver: BullmqDriver, redis_server: RedisServer
) -> None:
    # waiting: no worker ever; prioritized and delayed alongside.
    driver.add_bulk("waits", [{"name": "a"}, {"name": "b"}, {"name": "c"}])
    driver.add("waits", "urgent", opts={"priority": 3})
    driver.add("waits", "later", opts={"delay": 3_600_000})
    # completed and failed: a worker runs them, then closes (the queue is then stopped).
    driver.add_bulk("done", [{"name": "ok"}, {"name": "ok"}])
    driver.add("done", "bad", data={"fail": True})
    worker = driver.start_worker("done", "done-worker")
    driver.wait_finished("done", 3)
    driver.close_worker(worker)
    # active: a worker stays busy with a slow job.
    busy = driver.start_worker("busy", "busy-worker")
    driver.add("busy", "slow", data={"ms": SLOW_JOB_MS})
    driver.add("busy", "next")
    wait_until(lambda: driver.state("busy").counts["active"] == 1, 30, "the slow job active")
    # paused, with jobs held.
    driver.add_bulk("held", [{"name": "a"}, {"name": "b"}])
    driver.pause("held")

    stats = assert_equal_to_bullmq(driver, redis_server.url, ["waits", "done", "busy", "held"])

    # The comparison means something only if every state was there to compare.
    queues = by_name(stats)
    assert dict(queues["waits"].states()) | {"status": queues["waits"].status} == {
        "waiting": 3,
        "active": 0,
        "completed": 0,
        "failed": 0,
        "delayed": 1,
        "prioritized": 1,
        "waiting-children": 0,
        "paused": 0,
        "status": "stopped",
    }
    assert (queues["done"].completed, queues["done"].failed, queues["done"].status) == (
        2,
        1,
        "stopped",
    )
    assert (queues["busy"].active, queues["busy"].waiting, queues["busy"].status) == (
        1,
        1,
        "active",
    )
    assert (queues["held"].waiting, queues["held"].status) == (2, "paused")
    driver.close_worker(busy, force=True)


def test_a_worker_closing_turns_the_queue_stopped(
    driver: BullmqDriver, redis_server: RedisServer
) -> None:
    worker = driver.start_worker("orders", "orders-worker")
    assert assert_equal_to_bullmq(driver, redis_server.url, ["orders"]).queues[0].status == (
        "active"
    )
    driver.close_worker(worker)
    wait_until(lambda: driver.state("orders").workers == 0, 30, "the worker gone")
    assert assert_equal_to_bullmq(driver, redis_server.url, ["orders"]).queues[0].status == (
        "stopped"
    )


def test_job_schedulers_equal_what_bullmq_reports(
    driver: BullmqDriver, redis_server: RedisServer
) -> None:
    driver.open_queue("plain")
    driver.upsert_scheduler("cron", "yearly", pattern="0 0 1 1 *")
    driver.upsert_scheduler("cron", "six-minutes", pattern="*/6 * * * *")
    driver.upsert_scheduler("every", "hourly", every=3_600_000)

    stats = assert_equal_to_bullmq(driver, redis_server.url, ["plain", "cron", "every"])

    queues = by_name(stats)
    assert queues["plain"].recurring == RecurringJobs(count=0, next_run_ms=None, cron=None)
    cron = queues["cron"].recurring
    assert cron is not None
    assert (cron.count, cron.cron) == (2, "*/6 * * * *")
    every = queues["every"].recurring
    assert every is not None
    assert (every.count, every.cron) == (1, None)
    assert every.next_run_ms is not None


def test_a_key_of_the_wrong_type_makes_only_its_queue_invalid(
    driver: BullmqDriver, redis_server: RedisServer, sync_client: redis.Redis
) -> None:
    driver.add("fine", "job")
    sync_client.hset("bull:broken:meta", "opts.maxLenEvents", "10000")
    sync_client.set("bull:broken:wait", "not a list")
    sync_client.hset("bull:badrepeat:meta", "opts.maxLenEvents", "10000")
    sync_client.set("bull:badrepeat:repeat", "not a sorted set")

    stats = read(redis_server.url)

    assert [queue.name for queue in stats.queues] == ["fine"]
    assert by_name(stats)["fine"] == as_bullmq_reports("fine", driver.state("fine"))
    assert [(error.reason, error.path) for error in stats.invalid] == [
        ("invalid_payload", "bull:badrepeat:repeat"),
        ("invalid_payload", "bull:broken:wait"),
    ]
    assert "WRONGTYPE" in str(stats.invalid[1])


def test_a_legacy_marker_is_no_waiting_job(
    driver: BullmqDriver, redis_server: RedisServer, sync_client: redis.Redis
) -> None:
    driver.add_bulk("legacy", [{"name": "a"}, {"name": "b"}])
    # BullMQ 5 and older leave "0:<delay>" at the wait list's tail; getJobCounts skips it.
    sync_client.rpush("bull:legacy:wait", "0:0")
    stats = read(redis_server.url)
    assert stats.queues[0].waiting == 2
    assert_equal_to_bullmq(driver, redis_server.url, ["legacy"])


def test_without_client_list_the_status_is_unknown(
    driver: BullmqDriver, redis_server: RedisServer
) -> None:
    driver.add("orders", "job")

    async def main() -> Stats:
        client = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            return await read_stats(client, Queues("bull", {"orders": "orders"}), None)
        finally:
            await client.aclose()

    assert asyncio.run(main()).queues[0].status == "unknown"


def test_a_parent_waiting_for_its_children_equals_what_bullmq_reports(
    driver: BullmqDriver, redis_server: RedisServer
) -> None:
    # The driver has no flow command: a FlowProducer of the same pinned bullmq adds one.
    node = require_tool("node")
    script = (
        "import { FlowProducer } from 'bullmq';"
        f"const flows = new FlowProducer({{ connection: {{ host: '{HOST}', "
        f"port: {redis_server.port} }} }});"
        "await flows.add({ name: 'parent', queueName: 'orders', "
        "children: [{ name: 'child', queueName: 'lines' }] });"
        "await flows.close();"
    )
    subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=BULLMQ_DIR,
        check=True,
        timeout=60,
        capture_output=True,
    )

    stats = assert_equal_to_bullmq(driver, redis_server.url, ["orders", "lines"])

    assert dict(by_name(stats)["orders"].extra_states)["waiting-children"] == 1
    assert by_name(stats)["lines"].waiting == 1
