"""A real BullMQ on a real Redis for the integration tests: Debian's redis-server and bullmq.

`running_redis` starts redis-server on 127.0.0.1 without persistence, in its own directory,
and can stop, kill and restart it on the same port mid-test. `running_driver` starts
tests/bullmq/driver.mjs (bullmq pinned by its package-lock.json, installed by `npm ci`)
and `BullmqDriver` talks to it. Nothing here listens or connects beyond 127.0.0.1, and
every process is stopped by the PID it was started with.
"""

from __future__ import annotations

import functools
import itertools
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import pytest

from alerting_stack import require_tool
from upstream import HOST, free_port, stop_process, wait_until

__all__ = [
    "BULLMQ_DIR",
    "README_ACL",
    "BullmqDriver",
    "DriverError",
    "QueueView",
    "RedisServer",
    "acl_user",
    "ensure_node_modules",
    "redis_target_config",
    "running_driver",
    "running_redis",
]

BULLMQ_DIR = Path(__file__).resolve().parent / "bullmq"
DRIVER = BULLMQ_DIR / "driver.mjs"
PACKAGE_LOCK = BULLMQ_DIR / "package-lock.json"
PACKAGE_JSON = BULLMQ_DIR / "package.json"
#: npm ci writes this last; older than the lock (or package.json) means node_modules is stale.
INSTALLED_LOCK = BULLMQ_DIR / "node_modules" / ".package-lock.json"


# --- redis-server ------------------------------------------------------------------------


class RedisServer:
    """Debian's redis-server on 127.0.0.1:`port`, no persistence, files in `directory`.

    `stop()` and `kill()` end it by PID; `start()` brings it back on the same port, empty.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.directory = directory
        self.port = port if port is not None else free_port()
        self.log_path = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, ready_timeout: float = 10.0) -> None:
        """Start it and return once it answers PING; fails if it is already running."""
        if self.running:
            raise AssertionError(f"redis-server on port {self.port} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(self._answers_ping, ready_timeout, f"redis-server on port {self.port}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID (then SIGKILL after `timeout` s); its exit status."""
        if self._process is None:
            raise AssertionError("redis-server was never started")
        return stop_process(self._process, timeout)

    def kill(self) -> int:
        """SIGKILL by PID, as a crash; its exit status."""
        if self._process is None:
            raise AssertionError("redis-server was never started")
        if self._process.poll() is None:
            self._process.kill()
        return self._process.wait(10.0)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) it and start it again on the same port, with no data."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _answers_ping(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(
                f"redis-server exited with {self._process.returncode}:\n{self.log()}"
            )
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A started `RedisServer` in `directory`, stopped by PID on exit."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        if server.running:
            server.stop()


# --- bullmq from npm ---------------------------------------------------------------------


def ensure_node_modules() -> Path:
    """tests/bullmq/node_modules, installed by `npm ci` when missing or stale (as `make node-deps`).

    Skips (fails under JOBSTATS_REQUIRE_TOOLS) when node or npm is missing.
    """
    require_tool("node")
    npm = require_tool("npm")
    return _install_node_modules(npm)


@functools.cache
def _install_node_modules(npm: str) -> Path:
    stale = not INSTALLED_LOCK.exists() or any(
        INSTALLED_LOCK.stat().st_mtime < source.stat().st_mtime
        for source in (PACKAGE_LOCK, PACKAGE_JSON)
    )
    if stale:
        # No install scripts: bullmq needs none, and the optional native msgpackr
        # accelerator ships prebuilt.
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=BULLMQ_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {BULLMQ_DIR} failed:\n{done.stdout}\n{done.stderr}")
        INSTALLED_LOCK.touch()
    return BULLMQ_DIR / "node_modules"


# --- The driver --------------------------------------------------------------------------


class DriverError(Exception):
    """The driver answered a command with {"error": ...}."""


@dataclass(frozen=True, slots=True)
class QueueView:
    """BullMQ's own view of one queue, and what the driver's listeners counted.

    - `counts`: getJobCounts() for waiting, active, completed, failed, delayed,
      prioritized, waiting-children and paused.
    - `workers`: getWorkers() count; `worker_names`: their connections' names.
    - `events`: entries the driver's QueueEvents read, by event name, plus `retried`
      (jobs moved from active back to waiting or delayed); counted from when the driver
      opened the queue.
    - `finished`: from the driver's workers: `completed`, `failed` (for good) and
      `retried` (failed attempts BullMQ retries).
    """

    counts: dict[str, int]
    paused: bool
    workers: int
    worker_names: list[str]
    schedulers: list[dict[str, Any]]
    events: dict[str, int]
    finished: dict[str, int]


class BullmqDriver:
    """tests/bullmq/driver.mjs as a process: one method per command, each with a timeout.

    Answers are matched to commands by id, so a command that timed out never leaves its
    late answer to the next one. Its stderr (BullMQ's and the driver's logs) goes to a file.
    """

    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self._ids = itertools.count(1)
        self._answers: dict[int | None, list[dict[str, Any]]] = {}
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="bullmq-driver", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    # -- protocol

    def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        """Send one command; its answer. DriverError for {"error": ...}."""
        command_id = next(self._ids)
        self.send_line(json.dumps({"id": command_id, "cmd": cmd, **args}))
        answer = self.wait_answer(command_id, timeout, cmd)
        if "error" in answer:
            raise DriverError(f"{cmd}: {answer['error']}")
        return answer

    def send_line(self, line: str) -> None:
        """Write one raw line to the driver's stdin (tests of the protocol itself)."""
        stdin = cast(IO[bytes], self.process.stdin)
        stdin.write(line.encode("utf-8") + b"\n")
        stdin.flush()

    def wait_answer(self, command_id: int | None, timeout: float, what: str) -> dict[str, Any]:
        """The next answer carrying `command_id` (None: answers to lines without an id)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not self._answers.get(command_id):
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"the driver exited with {self.process.returncode} before answering "
                        f"{what}:\n{self.stderr()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no answer to {what} from the driver within {timeout:g}s; "
                        f"its stderr:\n{self.stderr()[-4000:]}"
                    )
                self._arrived.wait(min(remaining, 0.5))
            return self._answers[command_id].pop(0)

    def _read(self) -> None:
        stdout = cast(IO[bytes], self.process.stdout)
        for raw in stdout:
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {"id": None, "error": f"driver wrote a line that is not JSON: {raw!r}"}
            with self._arrived:
                self._answers.setdefault(answer.get("id"), []).append(answer)
                self._arrived.notify_all()
        with self._arrived:
            self._arrived.notify_all()

    # -- commands

    def open_queue(self, queue: str, *, events_max_len: int | None = None) -> None:
        """Open `queue` first, e.g. with streams.events.maxLen (default BullMQ's 10,000)."""
        args: dict[str, Any] = {"queue": queue}
        if events_max_len is not None:
            args["eventsMaxLen"] = events_max_len
        self.call("open", **args)

    def add(
        self,
        queue: str,
        name: str = "job",
        data: Mapping[str, Any] | None = None,
        opts: Mapping[str, Any] | None = None,
    ) -> str:
        """Queue.add; the job's id. data: {"ms", "fail", "failAttempts"}; opts: BullMQ's."""
        answer = self.call(
            "add", queue=queue, name=name, data=dict(data or {}), opts=dict(opts or {})
        )
        return cast(str, answer["jobId"])

    def add_bulk(self, queue: str, jobs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Queue.addBulk of {"name", "data", "opts"} mappings; the jobs' ids."""
        answer = self.call("addBulk", queue=queue, jobs=[dict(job) for job in jobs])
        return cast(list[str], answer["jobIds"])

    def start_worker(
        self,
        queue: str,
        worker: str | None = None,
        *,
        concurrency: int = 1,
        anonymous: bool = False,
        timeout: float = 30.0,
    ) -> str:
        """A Worker named `worker` (its handle; generated when None); returns once its
        connection shows in CLIENT LIST. `anonymous`: BullMQ gets no worker name."""
        args: dict[str, Any] = {"queue": queue, "concurrency": concurrency, "anonymous": anonymous}
        if worker is not None:
            args["worker"] = worker
        answer = self.call(
            "startWorker", timeout=timeout + 5, timeoutMs=int(timeout * 1000), **args
        )
        return cast(str, answer["worker"])

    def close_worker(self, worker: str, *, force: bool = False, timeout: float = 30.0) -> None:
        """Worker.close (waits for its active jobs unless `force`)."""
        self.call("closeWorker", timeout=timeout, worker=worker, force=force)

    def pause(self, queue: str) -> None:
        self.call("pause", queue=queue)

    def resume(self, queue: str) -> None:
        self.call("resume", queue=queue)

    def upsert_scheduler(
        self,
        queue: str,
        scheduler_id: str,
        *,
        pattern: str | None = None,
        every: int | None = None,
        name: str | None = None,
        data: Mapping[str, Any] | None = None,
        opts: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Queue.upsertJobScheduler with a cron `pattern` or `every` ms; the next job's id."""
        args: dict[str, Any] = {"queue": queue, "schedulerId": scheduler_id}
        for key, value in (("pattern", pattern), ("every", every), ("name", name)):
            if value is not None:
                args[key] = value
        if data is not None:
            args["data"] = dict(data)
        if opts is not None:
            args["opts"] = dict(opts)
        return cast(str | None, self.call("upsertScheduler", **args)["jobId"])

    def remove_scheduler(self, queue: str, scheduler_id: str) -> bool:
        return cast(
            bool, self.call("removeScheduler", queue=queue, schedulerId=scheduler_id)["removed"]
        )

    def state(self, queue: str) -> QueueView:
        """BullMQ's own view of `queue` now, and the driver's counts."""
        answer = self.call("state", queue=queue)
        return QueueView(
            counts=answer["counts"],
            paused=answer["paused"],
            workers=answer["workers"],
            worker_names=answer["workerNames"],
            schedulers=answer["schedulers"],
            events=answer["events"],
            finished=answer["finished"],
        )

    def job_state(self, queue: str, job_id: str) -> dict[str, Any]:
        """{"state", "attemptsMade", "attemptsStarted", "failedReason"}; state "unknown" if gone."""
        return self.call("jobState", queue=queue, jobId=job_id)

    def wait_finished(self, queue: str, count: int, timeout: float = 30.0) -> dict[str, int]:
        """Until the driver's workers finished `count` jobs of `queue` (completed + failed
        for good, since the driver started); `finished` as in QueueView."""
        answer = self.call(
            "waitFinished",
            timeout=timeout + 5,
            queue=queue,
            count=count,
            timeoutMs=int(timeout * 1000),
        )
        return cast(dict[str, int], answer["finished"])

    def wait_events(
        self, queue: str, event: str, count: int, timeout: float = 30.0
    ) -> dict[str, int]:
        """Until the driver's QueueEvents read `count` entries named `event`; `events`."""
        answer = self.call(
            "waitEvents",
            timeout=timeout + 5,
            queue=queue,
            event=event,
            count=count,
            timeoutMs=int(timeout * 1000),
        )
        return cast(dict[str, int], answer["events"])

    def trim_events(self, queue: str, max_len: int) -> int:
        """Queue.trimEvents(max_len) (an approximate XTRIM); entries removed."""
        return cast(int, self.call("trimEvents", queue=queue, maxLen=max_len)["removed"])

    def obliterate(self, queue: str, *, force: bool = True) -> None:
        self.call("obliterate", queue=queue, force=force)

    def quit(self, timeout: float = 15.0) -> int:
        """Close every worker, queue and connection, then exit; the exit status."""
        if self.process.poll() is None:
            self.call("quit", timeout=timeout)
        status = self.process.wait(timeout)
        self.stop()
        return status

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID (then SIGKILL); the exit status."""
        status = stop_process(self.process, timeout)
        self._reader.join(timeout)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()
        return status


def start_driver(
    redis_url: str, directory: Path, *, prefix: str = "bull", ready_timeout: float = 30.0
) -> BullmqDriver:
    """driver.mjs connected to `redis_url` with key prefix `prefix`, once it said ready."""
    node = require_tool("node")
    ensure_node_modules()
    directory.mkdir(parents=True, exist_ok=True)
    stderr_path = directory / "bullmq-driver.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [node, str(DRIVER), "--redis-url", redis_url, "--prefix", prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=BULLMQ_DIR,
        )
    driver = BullmqDriver(process, stderr_path)
    try:
        hello = driver.wait_answer(None, ready_timeout, "its start")
        if not hello.get("ready"):
            raise AssertionError(f"the driver's first line is not ready: {hello}")
    except BaseException:
        driver.stop()
        raise
    return driver


@contextmanager
def running_driver(
    redis_url: str, directory: Path, *, prefix: str = "bull"
) -> Iterator[BullmqDriver]:
    """A started driver; on exit it quits cleanly if it can, and is stopped by PID anyway."""
    driver = start_driver(redis_url, directory, prefix=prefix)
    try:
        yield driver
    finally:
        # A quit that cannot finish (Redis gone for good) must not hide the test's own error.
        with suppress(AssertionError, DriverError, OSError, subprocess.TimeoutExpired):
            driver.quit()
        driver.stop()


def redis_target_config(
    directory: Path, api_url: str | None, redis_url: str, extra: str = "", timeout: str = "2s"
) -> Path:
    """An exporter config file whose one target, `shop`, reads the stats API at `api_url`
    (none when None) and the BullMQ Redis at `redis_url`, looking for new queues every
    second, with `timeout`; `extra` adds lines to its `redis:` section."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "jobstats.yml"
    url = f"    url: {api_url}\n" if api_url else ""
    config.write_text(
        "targets:\n"
        "  - name: shop\n"
        f"{url}"
        f"    timeout: {timeout}\n"
        "    redis:\n"
        f"      url: {redis_url}\n"
        "      discovery_interval: 1s\n"
        f"{extra}",
        encoding="utf-8",
    )
    return config


#: What the README (section Permissions) tells a user to grant the exporter.
README_ACL = "-@all +@read +multi +exec +ping +client|list"


def acl_user(server: RedisServer, password: str, rules: str = README_ACL) -> None:
    """Make the Redis ACL user `monitoring`, with `password`, on the keys `bull:*`."""
    import redis

    client = redis.Redis(host=HOST, port=server.port)
    try:
        client.execute_command(
            f"ACL SETUSER monitoring on >{password} ~bull:* resetchannels {rules}"
        )
    finally:
        client.close()
