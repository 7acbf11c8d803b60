"""process_*: the same families as prometheus_client's ProcessCollector, read cheaply."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import render_text
from exporter.process import ProcessMetrics


def samples(text: str) -> dict[str, tuple[str, str, float]]:
    return {
        family.name: (family.type, family.documentation, family.samples[0].value)
        for family in text_string_to_metric_families(text)
    }


def test_the_families_are_prometheus_clients_with_the_same_values() -> None:
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    theirs = samples(generate_latest(registry).decode())
    ours = samples(render_text(ProcessMetrics().families()))

    assert list(ours) == list(theirs)
    for name, (kind, help_text, _) in ours.items():
        assert (kind, help_text) == theirs[name][:2], name
    assert ours["process_start_time_seconds"][2] == theirs["process_start_time_seconds"][2]
    assert ours["process_max_fds"][2] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # Read a moment apart: memory and CPU may have moved a little, not by half.
    for name in ("process_resident_memory_bytes", "process_virtual_memory_bytes"):
        assert theirs[name][2] / 2 < ours[name][2] < theirs[name][2] * 2, name
    cpu = theirs["process_cpu_seconds"][2]
    assert cpu <= ours["process_cpu_seconds"][2] < cpu + 1
    assert ours["process_open_fds"][2] >= 3


def test_without_proc_there_are_no_process_metrics(tmp_path: Path) -> None:
    assert ProcessMetrics(str(tmp_path)).families() == []


def open_fds(metrics: ProcessMetrics) -> float:
    return samples(render_text(metrics.families()))["process_open_fds"][2]


def test_open_fds_counts_each_descriptor_without_listing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = ProcessMetrics()
    before = open_fds(metrics)
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    try:
        # Listing /proc/self/fd costs milliseconds once a flood holds thousands of sockets;
        # procfs gives the count as the directory's size.
        with monkeypatch.context() as patched:
            patched.setattr(os, "listdir", lambda path: pytest.fail(f"listed {path}"))
            during = open_fds(metrics)
    finally:
        for fd in held:
            os.close(fd)
    assert during - before == 50
    assert open_fds(metrics) == before


def fake_proc(folder: Path, utime: int = 0, stime: int = 0, fds: int = 0) -> str:
    """A /proc with this process's stat and `fds` entries in its fd folder."""
    (folder / "stat").write_text("btime 1700000000\n")
    (folder / "self" / "fd").mkdir(parents=True)
    fields = ["S"] + ["0"] * 51
    fields[11], fields[12], fields[20], fields[21] = str(utime), str(stime), "4096", "10"
    (folder / "self" / "stat").write_text("1 (a (b) c) " + " ".join(fields))
    (folder / "self" / "limits").write_text("Max open files 1024 1024 files\n")
    for fd in range(fds):
        (folder / "self" / "fd" / str(fd)).touch()
    return str(folder)


def test_open_fds_lists_the_directory_where_its_size_is_no_count(tmp_path: Path) -> None:
    assert open_fds(ProcessMetrics(fake_proc(tmp_path, fds=7))) == 7


def test_cpu_seconds_are_summed_as_prometheus_client_sums_them(tmp_path: Path) -> None:
    # 1/100 + 20/100 is 0.21000000000000002 in floats, (1 + 20)/100 is 0.21.
    proc = fake_proc(tmp_path, utime=1, stime=20)
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry, proc=proc)
    theirs = samples(generate_latest(registry).decode())["process_cpu_seconds"][2]
    ours = samples(render_text(ProcessMetrics(proc).families()))["process_cpu_seconds"][2]
    assert ours == theirs
