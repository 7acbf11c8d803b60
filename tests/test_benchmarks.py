"""The benchmark and the soak run still work: short versions, run as the Makefile runs them.

Only that they finish, exit 0 and print their report is asserted. Their timings are
information for benchmarks/RESULTS.md and never a test's verdict.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
#: Seconds either run may take on a loaded machine before the test gives up on it.
PATIENCE = 120


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )


def test_quick_benchmark_reports_every_size_and_target(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"

    run = run_script("bench.py", "--quick", "--results", str(results))

    assert run.returncode == 0, run.stderr
    assert "| queues | answer KiB | exposition KiB | scrapes |" in run.stdout
    for size in ("2", "100", "1,000", "10,000"):
        assert f"\n| {size} | " in run.stdout
    for scrapers in (1, 8, 32):
        assert f"\n| {scrapers} | 64 | " in run.stdout
    assert "| target | measured | result |" in run.stdout
    assert "- CPU: " in run.stdout
    # Issue 12's targets: each reported with a verdict, whatever it is today.
    for target in (
        "| 1,000 queues: scrape < 20.00 ms p50 | ",
        "| 1,000 queues: scrape p50 < 25 x the direct GET's | ",
        "| peak RSS < 35.0 MiB up to 1,000 queues, no Redis configured | ",
        "| flood: all 200 half-request connections accepted within 5 s | ",
        "| flood: meanwhile a scrape on a new connection < 100.00 ms p99 (",
        "| flood: exporter peak RSS < 100 MiB | ",
        "| flood: 1 s after the flood the server has closed them all | ",
    ):
        assert target in run.stdout
    assert "## Connection flood" in run.stdout
    assert "| connections the exporter held | " in run.stdout
    assert "## Peer: blackbox_exporter on the same upstream" in run.stdout
    if shutil.which("prometheus-blackbox-exporter"):
        assert "| 2 queues: exporter overhead p50 <= 1.25 x blackbox_exporter's " in run.stdout
        assert "\n| blackbox_exporter | 20 | " in run.stdout
        assert "\n| jobstats-exporter | 20 | " in run.stdout
    else:
        assert "skipped: no prometheus-blackbox-exporter on PATH" in run.stdout
        assert " | skipped |" in run.stdout
    assert "## Redis source: tailing the event streams" in run.stdout
    if shutil.which("redis-server"):
        # 2,000 events/s for a second: every job counted, nothing missed, parser by parser.
        assert "| pure Python parser | no | 2,000 | " in run.stdout
        assert "| 600 / 600 | 60 / 60 | 10/10 | 0 | " in run.stdout
        if importlib.util.find_spec("hiredis"):
            assert "| hiredis | yes | 2,000 | " in run.stdout
            assert "hiredis: exporter CPU at 2,000 events/s " in run.stdout
        # A Redis-only target: every one of 20 queues found, scraped 3 times; no timing judged.
        assert "## Redis only: the whole card from BullMQ's Redis" in run.stdout
        assert "\n| 20 | 219 | " in run.stdout
        assert "| Redis only, 20 queues: scrape p50 < 1 s " in run.stdout
    else:
        assert "skipped: no redis-server on PATH" in run.stdout
    assert results.read_text(encoding="utf-8").rstrip() == run.stdout.rstrip()


def test_quick_soak_passes_through_every_phase_without_violation() -> None:
    run = run_script("soak.py", "--quick", "--no-timing")

    assert run.returncode == 0, run.stdout + run.stderr
    assert "; 0 violations." in run.stdout
    for phase in ("ok", "down", "slow", "http_500", "garbage", "huge", "redis_down"):
        assert f"\n| {phase} | " in run.stdout
    assert "| open fds |" in run.stdout
