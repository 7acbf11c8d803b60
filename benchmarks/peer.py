"""The peer row: Debian's blackbox_exporter probing the same upstream as the exporter.

One GET per scrape for both, so their overhead over a direct GET of the same answer is
the cost of being an exporter; the three are interleaved on keep-alive connections in
one run, and only their ratio is judged. blackbox_exporter is started here on 127.0.0.1
and stopped by its PID; this module never installs it (`make bench-deps` does).
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from harness import (
    HOST,
    ExporterProcess,
    HarnessError,
    KeepAliveClient,
    cpu_seconds,
    free_port,
    memory_bytes,
    percentile,
    stop_process,
)

BLACKBOX = "prometheus-blackbox-exporter"
MODULE = "http_2xx"
#: The blackbox module: one GET, any 2xx is success; as `exporter`'s own target does.
BLACKBOX_CONFIG = f"""\
modules:
  {MODULE}:
    prober: http
    timeout: 30s
    http:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
"""
#: The target: the exporter's overhead p50 at most this many times blackbox_exporter's.
OVERHEAD_RATIO_TARGET = 1.25
READY_TIMEOUT = 30.0


class BlackboxProcess:
    """`prometheus-blackbox-exporter` on 127.0.0.1:<free port> with the `http_2xx` module."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._folder = tempfile.TemporaryDirectory(prefix="jobstats-bench-blackbox-")
        folder = Path(self._folder.name)
        config_file = folder / "blackbox.yml"
        config_file.write_text(BLACKBOX_CONFIG, encoding="utf-8")
        self.port = free_port()
        self._log = folder / "blackbox.log"
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--web.listen-address={HOST}:{self.port}",
                    "--log.level=error",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def probe_path(self, target_url: str) -> str:
        return "/probe?" + urlencode({"target": target_url, "module": MODULE})

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
                connection.request("GET", "/-/healthy")
                status = connection.getresponse().status
                connection.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise HarnessError(f"blackbox_exporter was not ready within {READY_TIMEOUT:g}s")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            output = self._log.read_text("utf-8", errors="replace")[-4000:]
            raise HarnessError(
                f"blackbox_exporter exited with status {self.process.returncode}:\n{output}"
            )

    def version(self) -> str:
        """The first line of `--version`, e.g. `blackbox_exporter, version 0.23.0 (...)`."""
        run = subprocess.run(
            [self.binary, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return (run.stdout or run.stderr).strip().splitlines()[0]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL after `timeout` seconds; removes its folder."""
        stop_process(self.process, timeout)
        self._folder.cleanup()


@dataclass(frozen=True, slots=True)
class PeerSide:
    """One exporter's figures over the interleaved scrapes."""

    name: str
    latencies: list[float]
    cpu_seconds: float
    peak_rss: int

    def overhead_p50(self, direct: list[float]) -> float:
        return percentile(self.latencies, 0.5) - percentile(direct, 0.5)


@dataclass(frozen=True, slots=True)
class PeerResult:
    version: str
    queues: int
    scrapes: int
    direct: list[float]
    exporter: PeerSide
    blackbox: PeerSide

    def overhead_ratio(self) -> float:
        """The exporter's overhead p50 over blackbox_exporter's (inf when blackbox's is <= 0)."""
        blackbox = self.blackbox.overhead_p50(self.direct)
        if blackbox <= 0:
            return float("inf")
        return self.exporter.overhead_p50(self.direct) / blackbox


def run_peer(
    exporter: ExporterProcess,
    upstream_port: int,
    queues: int,
    scrapes: int,
    warmup: int,
    headers: Mapping[str, str],
) -> PeerResult | str:
    """`scrapes` rounds of: a direct GET of /q<queues>, a scrape of the exporter's target
    q<queues>, a blackbox probe of the same URL; or why the row was skipped.
    """
    binary = shutil.which(BLACKBOX)
    if binary is None:
        return f"skipped: no {BLACKBOX} on PATH (`make bench-deps` installs Debian's)"
    path = f"/q{queues}"
    blackbox = BlackboxProcess(binary)
    direct = KeepAliveClient(upstream_port)
    scraper = KeepAliveClient(exporter.port)
    prober = KeepAliveClient(blackbox.port)
    probe = f"/probe?target=q{queues}"
    blackbox_probe = blackbox.probe_path(f"http://{HOST}:{upstream_port}{path}")
    try:
        for _ in range(warmup):
            direct.get_ok(path)
            scraper.get_ok(probe, headers)
            answer, _ = prober.get_ok(blackbox_probe, headers)
            if b"\nprobe_success 1" not in answer:
                raise HarnessError(f"blackbox probe did not succeed:\n{answer[:2000].decode()}")
        direct_times: list[float] = []
        exporter_times: list[float] = []
        blackbox_times: list[float] = []
        exporter_cpu = exporter.cpu_seconds()
        blackbox_cpu = cpu_seconds(blackbox.pid)
        # Interleaved, so noise on the machine hits all three series alike.
        for _ in range(scrapes):
            direct_times.append(direct.get_ok(path)[1])
            exporter_times.append(scraper.get_ok(probe, headers)[1])
            blackbox_times.append(prober.get_ok(blackbox_probe, headers)[1])
        exporter_cpu = exporter.cpu_seconds() - exporter_cpu
        blackbox_cpu = cpu_seconds(blackbox.pid) - blackbox_cpu
        exporter.check_alive()
        blackbox.check_alive()
        return PeerResult(
            blackbox.version(),
            queues,
            scrapes,
            direct_times,
            PeerSide(
                "jobstats-exporter",
                exporter_times,
                exporter_cpu,
                exporter.memory_bytes("VmHWM"),
            ),
            PeerSide(
                "blackbox_exporter",
                blackbox_times,
                blackbox_cpu,
                memory_bytes(blackbox.pid, "VmHWM"),
            ),
        )
    finally:
        prober.close()
        scraper.close()
        direct.close()
        blackbox.stop()


def peer_table(result: PeerResult) -> list[str]:
    lines = [
        "| exporter | scrapes | p50 ms | p99 ms | overhead p50 over a direct GET ms"
        " | CPU ms/scrape | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| direct GET of the upstream | {result.scrapes}"
        f" | {percentile(result.direct, 0.5) * 1000:.2f}"
        f" | {percentile(result.direct, 0.99) * 1000:.2f} | | | |",
    ]
    for side in (result.blackbox, result.exporter):
        lines.append(
            f"| {side.name} | {result.scrapes} | {percentile(side.latencies, 0.5) * 1000:.2f}"
            f" | {percentile(side.latencies, 0.99) * 1000:.2f}"
            f" | {side.overhead_p50(result.direct) * 1000:.2f}"
            f" | {side.cpu_seconds / result.scrapes * 1000:.2f}"
            f" | {side.peak_rss / 1024 / 1024:.1f} |"
        )
    return lines


def peer_targets(result: PeerResult) -> list[tuple[str, str, bool | None]]:
    ratio = result.overhead_ratio()
    exporter = result.exporter.overhead_p50(result.direct) * 1000
    blackbox = result.blackbox.overhead_p50(result.direct) * 1000
    return [
        (
            f"{result.queues} queues: exporter overhead p50 <= {OVERHEAD_RATIO_TARGET:g} x"
            " blackbox_exporter's (same upstream, same run)",
            f"{exporter:.2f} / {blackbox:.2f} ms = {ratio:.2f} x",
            ratio <= OVERHEAD_RATIO_TARGET,
        )
    ]


def peer_section(result: PeerResult | str) -> list[str]:
    lines = [
        "## Peer: blackbox_exporter on the same upstream",
        "",
        "Debian's `prometheus-blackbox-exporter`, its `http_2xx`-like module (one GET, any",
        "2xx), probes the same upstream URL as the exporter's 2-queue target; each round is a",
        "direct GET, a scrape of the exporter and a probe of blackbox_exporter, each on its",
        "own keep-alive connection, with the same scrape-timeout header. blackbox_exporter",
        "opens a new upstream connection per probe, the exporter reuses its own. CPU is each",
        "process' user + system time over the rounds; peak RSS is its VmHWM after them.",
        "",
    ]
    if isinstance(result, str):
        return [*lines, result, ""]
    return [*lines, f"Peer: {result.version}.", "", *peer_table(result), ""]
