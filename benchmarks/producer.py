"""A synthetic BullMQ producer: job events written straight into the queues' event streams.

Each job writes what BullMQ's Lua scripts write: `waiting` (jobId), `active` (jobId,
prev waiting), then `completed` (jobId, returnvalue, prev active) or `failed` (jobId,
failedReason, prev active), each XADD with MAXLEN ~ the queue's maxLenEvents. Run as its
own process; it prints what it wrote as one JSON line. It runs no jobs and no Lua.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

#: BullMQ's default `opts.maxLenEvents`: the streams keep about this many entries.
MAX_LEN_EVENTS = 10_000
#: Every FAIL_EVERY-th job of a queue fails for good; the others complete.
FAIL_EVERY = 10
#: Most entries sent in one pipeline: one round trip stays short.
MAX_BATCH = 500
#: Seconds slept when nothing is due yet.
TICK = 0.002


def queue_names(count: int) -> list[str]:
    return [f"bench-{index:02d}" for index in range(count)]


def create_queues(client: redis.Redis, prefix: str, names: Sequence[str]) -> None:
    """Each queue's meta hash, as BullMQ writes it: what discovery finds and trims by."""
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hset(
                f"{prefix}:{name}:meta",
                mapping={"opts.maxLenEvents": MAX_LEN_EVENTS, "version": "bullmq:5.0.0"},
            )
        pipe.execute()


@dataclass(slots=True)
class QueueWriter:
    """One queue's stream: its jobs' events in order, one job after the other."""

    stream: str
    sent: int = 0
    completed: int = 0
    failed: int = 0

    def next_event(self) -> tuple[str, ...]:
        """The next entry's fields and values, in BullMQ's order."""
        job, step = divmod(self.sent, 3)
        self.sent += 1
        job_id = str(job + 1)
        if step == 0:
            return ("event", "waiting", "jobId", job_id)
        if step == 1:
            return ("event", "active", "jobId", job_id, "prev", "waiting")
        if (job + 1) % FAIL_EVERY == 0:
            self.failed += 1
            return ("event", "failed", "jobId", job_id, "failedReason", "boom", "prev", "active")
        self.completed += 1
        return ("event", "completed", "jobId", job_id, "returnvalue", "null", "prev", "active")


def produce(
    client: redis.Redis, writers: Sequence[QueueWriter], rate: float, seconds: float
) -> float:
    """Write rate * seconds events round-robin over `writers`, paced; the seconds it took."""
    total = int(rate * seconds)
    written = 0
    started = time.monotonic()
    while written < total:
        elapsed = time.monotonic() - started
        due = min(total, int(rate * elapsed)) - written
        if due <= 0:
            time.sleep(TICK)
            continue
        batch = min(due, MAX_BATCH)
        with client.pipeline(transaction=False) as pipe:
            for index in range(written, written + batch):
                writer = writers[index % len(writers)]
                # As BullMQ's scripts write it; execute_command skips xadd's argument checks,
                # a third of the producer's CPU, which shares the machine with the exporter.
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "XADD", writer.stream, "MAXLEN", "~", MAX_LEN_EVENTS, "*", *writer.next_event()
                )
            pipe.execute()
        written += batch
    return time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True, help="redis://127.0.0.1:PORT/0")
    parser.add_argument("--prefix", default="bull")
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20_000, help="events per second, in all")
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.url)
    writers = [QueueWriter(f"{args.prefix}:{name}:events") for name in queue_names(args.queues)]
    try:
        took = produce(client, writers, args.rate, args.seconds)
    finally:
        client.close()
    names = queue_names(args.queues)
    summary = {
        "events": sum(writer.sent for writer in writers),
        "seconds": took,
        "completed": {name: writer.completed for name, writer in zip(names, writers, strict=True)},
        "failed": {name: writer.failed for name, writer in zip(names, writers, strict=True)},
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
