"""What BullMQ's event stream entries count for, read from a real BullMQ 6.7 capture.

The capture (tests/fixtures/samples/bullmq-redis-capture.json) holds every entry of two
queues' streams: inventory ran 2 jobs that completed, 1 that failed with 1 attempt and 1
that failed after 3 attempts; product is paused with 2 waiting jobs and 1 delayed.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.events import BUCKETS, STALE_MS, EventCounts, Timings

from samples import bullmq_capture

CAPTURE = bullmq_capture()


def replay(counts: EventCounts, queue: str) -> None:
    for entry_id, fields in CAPTURE["streams"][f"bull:{queue}:events"]:
        counts.apply(queue, entry_id, fields)


def test_completed_failed_and_retries_are_counted_as_the_capture_ran_them() -> None:
    counts = EventCounts()
    replay(counts, "inventory")
    inventory = counts.queues["inventory"]
    assert (inventory.completed, inventory.failed, inventory.retries) == (2, 2, 2)
    assert inventory.missed == 0


def test_a_paused_queue_with_waiting_and_delayed_jobs_counts_nothing_finished() -> None:
    counts = EventCounts()
    replay(counts, "product")
    product = counts.queues["product"]
    assert (product.completed, product.failed, product.retries) == (0, 0, 0)
    assert product.wait.cumulative()[-1] == 0
    # Two jobs wait for the queue to resume; their start is kept to time them.
    assert counts.pending == 2


def test_run_times_pair_each_attempt_with_its_start() -> None:
    counts = EventCounts()
    replay(counts, "inventory")
    inventory = counts.queues["inventory"]
    # Jobs 2 and 3 ran 45 ms and 42 ms.
    assert inventory.run_completed.cumulative()[-1] == 2
    assert inventory.run_completed.total == pytest.approx(0.087)
    # Job 4's one attempt (23 ms) and job 5's three (23, 21 and 21 ms) failed.
    assert inventory.run_failed.cumulative()[-1] == 4
    assert inventory.run_failed.total == pytest.approx(0.088)


def test_wait_times_run_from_waiting_to_active_for_every_attempt() -> None:
    counts = EventCounts()
    replay(counts, "inventory")
    wait = counts.queues["inventory"].wait
    # Jobs 2 to 5 waited 0, 45, 76 and 90 ms; job 5's retries 0 and 1 ms.
    assert wait.cumulative()[-1] == 6
    assert wait.total == pytest.approx(0.212)
    assert wait.cumulative()[BUCKETS.index(0.005)] == 3  # 0, 0 and 1 ms


def test_a_job_whose_start_was_not_seen_is_counted_but_not_timed() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "completed", "jobId": "7", "prev": "active"})
    q = counts.queues["q"]
    assert q.completed == 1
    assert q.run_completed.cumulative()[-1] == 0


def test_a_retry_with_backoff_is_a_delayed_entry_of_a_running_job() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "waiting", "jobId": "1"})
    counts.apply("q", "1000-1", {"event": "active", "jobId": "1", "prev": "waiting"})
    counts.apply("q", "1250-0", {"event": "delayed", "jobId": "1", "delay": "5250"})
    q = counts.queues["q"]
    assert q.retries == 1
    assert q.run_failed.total == pytest.approx(0.25)


def test_a_new_delayed_job_is_no_retry() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "added", "jobId": "1", "name": "x"})
    counts.apply("q", "1000-1", {"event": "delayed", "jobId": "1", "delay": "9000"})
    assert counts.queues["q"].retries == 0


def test_a_stalled_job_put_back_is_a_retry() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "active", "jobId": "1", "prev": "waiting"})
    counts.apply("q", "31000-0", {"event": "waiting", "jobId": "1", "prev": "active"})
    counts.apply("q", "31000-1", {"event": "stalled", "jobId": "1"})
    assert counts.queues["q"].retries == 1


def test_entries_without_a_job_change_nothing_but_make_the_queue_known() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "paused"})
    counts.apply("q", "1000-1", {"event": "drained"})
    assert "q" not in counts.queues


def test_the_pending_map_is_capped_keeping_the_oldest_and_counting_the_rest() -> None:
    counts = EventCounts(max_pending=3)
    for job in range(5):
        counts.apply("q", f"{1000 + job}-0", {"event": "waiting", "jobId": str(job)})
    assert counts.pending == 3
    assert counts.dropped == 2
    # In a backlog the oldest start next: job 0 is timed, job 4 (refused) is not.
    counts.apply("q", "2000-0", {"event": "active", "jobId": "0", "prev": "waiting"})
    counts.apply("q", "2000-1", {"event": "active", "jobId": "4", "prev": "waiting"})
    assert counts.queues["q"].wait.cumulative()[-1] == 1


def test_a_job_pending_for_over_an_hour_makes_room_when_the_map_is_full() -> None:
    counts = EventCounts(max_pending=2)
    counts.apply("q", "1000-0", {"event": "waiting", "jobId": "stale"})
    counts.apply("q", "2000-0", {"event": "waiting", "jobId": "1"})
    later = 1000 + STALE_MS + 1
    counts.apply("q", f"{later}-0", {"event": "waiting", "jobId": "2"})
    assert counts.dropped == 1
    counts.apply("q", f"{later}-1", {"event": "active", "jobId": "2", "prev": "waiting"})
    counts.apply("q", f"{later}-2", {"event": "active", "jobId": "stale", "prev": "waiting"})
    assert counts.queues["q"].wait.cumulative()[-1] == 1  # job 2 timed, the stale one not


def test_a_removed_job_leaves_the_pending_map() -> None:
    counts = EventCounts()
    counts.apply("q", "1000-0", {"event": "waiting", "jobId": "1"})
    counts.apply("q", "1001-0", {"event": "removed", "jobId": "1", "prev": "wait"})
    assert counts.pending == 0


def test_forgetting_a_queue_keeps_its_counters_and_drops_its_pending_jobs() -> None:
    counts = EventCounts()
    replay(counts, "product")
    replay(counts, "inventory")
    counts.forget("product")
    assert counts.pending == 0
    assert counts.queues["product"].completed == 0
    assert counts.queues["inventory"].completed == 2


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [(0.0, 0), (0.005, 0), (0.0051, 1), (1.0, 4), (3600.0, 11), (3600.5, 12)],
)
def test_a_value_on_a_bound_falls_in_that_bound_s_bucket(seconds: float, bucket: int) -> None:
    timings = Timings()
    timings.observe(seconds)
    assert timings.counts.index(1) == bucket


@given(st.lists(st.floats(min_value=0, max_value=10_000, allow_nan=False), max_size=50))
def test_cumulative_counts_never_fall_and_end_at_the_total_count(values: list[float]) -> None:
    timings = Timings()
    for value in values:
        timings.observe(value)
    cumulative = timings.cumulative()
    assert cumulative == sorted(cumulative)
    assert cumulative[-1] == len(values)
    assert timings.total == pytest.approx(sum(values))
