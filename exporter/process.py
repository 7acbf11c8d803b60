"""The process_* metrics every Prometheus client exports, read cheaply on each scrape.

The same names, help and values as prometheus_client's ProcessCollector, from
one read of /proc/self/stat, the fd count and the open-files limit, without its
registry and per-sample objects. The fd count is the size Linux 6.2 and later give
/proc/self/fd, as Go's procfs reads it: listing the directory costs 11 ms once a
connection flood holds 5,000 sockets, on every scrape. Where there is no /proc (not
Linux), there are no process_* metrics, as with prometheus_client.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from .exposition import Family, single

__all__ = ["ProcessMetrics"]


class ProcessMetrics:
    """Reads this process's CPU, memory, start time and file descriptors from `proc`."""

    def __init__(self, proc: str = "/proc") -> None:
        self._stat = str(Path(proc, "self", "stat"))
        self._fds = str(Path(proc, "self", "fd"))
        #: Only procfs gives a directory's entry count as its size; a copy on disk does not.
        self._fd_count_in_size = proc == "/proc"
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page_size = resource.getpagesize()
        self._boot_time: float | None = None
        try:
            for line in Path(proc, "stat").read_bytes().splitlines():
                if line.startswith(b"btime "):
                    self._boot_time = float(line.split()[1])
        except OSError:
            pass

    def families(self) -> list[Family]:
        """process_*, in prometheus_client's order; none where /proc cannot be read."""
        if self._boot_time is None:
            return []
        try:
            # The command name may hold spaces and parentheses: the fields follow its last ")".
            fields = _read(self._stat).rpartition(b")")[2].split()
            open_fds = self._open_fds()
        except OSError:
            return []
        max_fds = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        if max_fds < 0:
            max_fds = float("inf")  # RLIM_INFINITY
        ticks = self._ticks
        return [
            single(
                "process_virtual_memory_bytes", "Virtual memory size in bytes.", float(fields[20])
            ),
            single(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                float(fields[21]) * self._page_size,
            ),
            single(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                float(fields[19]) / ticks + self._boot_time,
            ),
            Family(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                "counter",
                # As prometheus_client sums them: (u + s) / t can differ in the last bit.
                rows=[((), float(fields[11]) / ticks + float(fields[12]) / ticks)],
            ),
            single("process_open_fds", "Number of open file descriptors.", open_fds),
            single("process_max_fds", "Maximum number of open file descriptors.", max_fds),
        ]

    def _open_fds(self) -> int:
        if self._fd_count_in_size:
            size = os.stat(self._fds).st_size
            if size > 0:
                return size
        # Before Linux 6.2 the size is 0; listing counts the listing's own fd too, as
        # prometheus_client's does.
        return len(os.listdir(self._fds))


def _read(path: str) -> bytes:
    # os.read: a third of the cost of a file object, on every scrape.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)
