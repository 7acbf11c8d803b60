"""Fixtures shared by the tests of BullMQ's Redis: a real redis-server and a real BullMQ."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bullmq_stack import BullmqDriver, RedisServer, running_driver, running_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on 127.0.0.1, no persistence, stopped by PID after the test."""
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def driver(redis_server: RedisServer, tmp_path: Path) -> Iterator[BullmqDriver]:
    """The real BullMQ (tests/bullmq/driver.mjs) on `redis_server`."""
    with running_driver(redis_server.url, tmp_path / "driver") as started:
        yield started
