"""Integration: the exporter as a real process, scraped over HTTP, reading a fake stats API.

Each test sets what the fake API on 127.0.0.1 answers, scrapes the process and reads
the exposition as Prometheus would (with prometheus_client's parser, never by grepping
numbers). Nothing here listens or connects beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from upstream import (
    HOST,
    STATS_PATH,
    Answer,
    Behaviour,
    ExporterProcess,
    FakeStatsApi,
    clean_environment,
    exporter_command,
    free_port,
    running_exporter,
    wait_until,
)

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "samples"
SAMPLE_NAMES = sorted(path.stem for path in SAMPLES.glob("*.json"))
#: Put in every faulty body: it must never reach the exporter's log.
MARKER = "SECRET-BODY-MARKER"
#: The exporter's upstream deadline in most tests: short, so that timeouts are cheap.
API_TIMEOUT = "1s"
BASE_STATES = ("waiting", "active", "completed", "failed", "delayed")
STATUSES = ("active", "paused", "stopped", "unknown")
REASONS = (
    "timeout",
    "connect",
    "http_status",
    "invalid_json",
    "invalid_payload",
    "api_failure",
    "too_large",
)
#: How long a test waits for something the exporter writes or serves.
PATIENCE = 20.0
#: What Prometheus 2.x sends: it prefers OpenMetrics.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def sample(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text(encoding="utf-8"))
    return document


def sample_queues(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The queues of an answer, as the API defines them: the object-valued keys of `stats`."""
    return {name: entry for name, entry in document["stats"].items() if isinstance(entry, dict)}


def marked(document: dict[str, Any]) -> dict[str, Any]:
    """`document` carrying MARKER in its message, so a leak of the body shows in the log."""
    return {**document, "message": f"{MARKER} {document.get('message', '')}"}


def json_answer(
    document: Any, status: int = 200, behaviour: Behaviour = "normal", delay: float = 3.0
) -> Answer:
    return Answer(
        status=status,
        body=json.dumps(document, ensure_ascii=False).encode("utf-8"),
        behaviour=behaviour,
        delay=delay,
    )


def html_answer(status: int) -> Answer:
    body = f"<html><body><h1>{status} Bad Gateway</h1><p>{MARKER}</p></body></html>"
    return Answer(status=status, body=body.encode(), headers=(("Content-Type", "text/html"),))


@dataclass(frozen=True, slots=True)
class Exposition:
    """One scrape's samples, as Prometheus' text format parser reads them."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, text: str, openmetrics: bool = False) -> Exposition:
        parse = openmetrics_families if openmetrics else text_string_to_metric_families
        return cls(tuple(sample for family in parse(text) for sample in family.samples))

    def series(self, name: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.name == name]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one series `name{labels}` (labels compared exactly)."""
        found = [sample.value for sample in self.series(name) if sample.labels == labels]
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0]

    def jobstats_names(self) -> set[str]:
        return {sample.name for sample in self.samples if sample.name.startswith("jobstats_")}

    def queue_series(self) -> list[Sample]:
        """Every series about Redis or queues: none may be left after a failed scrape."""
        prefixes = ("jobstats_redis", "jobstats_queue", "jobstats_invalid_queues")
        return [sample for sample in self.samples if sample.name.startswith(prefixes)]

    def queues(self) -> set[str]:
        return {sample.labels["queue"] for sample in self.series("jobstats_queue_jobs")}

    def samples_of_queue(self, queue: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.labels.get("queue") == queue]

    def errors(self) -> dict[str, float]:
        return {
            sample.labels["reason"]: sample.value
            for sample in self.series("jobstats_scrape_errors_total")
        }


def scrape(exporter: ExporterProcess, headers: Mapping[str, str] | None = None) -> Exposition:
    status, body = exporter.get("/metrics", headers)
    assert status == 200, body
    return Exposition.parse(body.decode("utf-8"))


def scrape_text(exporter: ExporterProcess) -> bytes:
    status, body = exporter.get("/metrics")
    assert status == 200, body
    return body


def new_log_lines(exporter: ExporterProcess, mark: int, needle: str) -> list[str]:
    """The stderr lines written after `mark`, once one of them contains `needle`."""
    wait_until(
        lambda: needle in exporter.stderr_since(mark), PATIENCE, f"{needle!r} in the exporter log"
    )
    return [line for line in exporter.stderr_since(mark).split("\n") if line]


def run_exporter(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m exporter args` to its end; its status, stdout and stderr."""
    return subprocess.run(
        exporter_command(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )


def closed_port_url() -> str:
    return f"http://{HOST}:{free_port()}{STATS_PATH}"


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi() as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture
def api(fake_api: FakeStatsApi) -> FakeStatsApi:
    """The module's fake API, answering enabled.json until the test says otherwise."""
    fake_api.answer(json_answer(sample("enabled")))
    return fake_api


@pytest.fixture(scope="module")
def exporter(
    fake_api: FakeStatsApi, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExporterProcess]:
    """One exporter process for the module, reading the fake API with a 1 s deadline."""
    args = ["--api.url", fake_api.url, "--api.timeout", API_TIMEOUT]
    with running_exporter(args, tmp_path_factory.mktemp("exporter")) as process:
        yield process
    assert "Traceback" not in process.stderr()


def assert_scrape_reported_down(
    exporter: ExporterProcess,
    api: FakeStatsApi,
    fault: Answer,
    reason: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """One scrape of `fault` is up 0, counted once under `reason`, logged once without the body.

    A good scrape first gives the counters to compare with, and proves the fault is
    what made the difference.
    """
    api.answer(json_answer(sample("enabled")))
    before = scrape(exporter)
    assert before.value("jobstats_up") == 1
    mark = exporter.stderr_mark()
    requests = api.requests
    api.answer(fault)

    after = scrape(exporter, headers)

    assert after.value("jobstats_up") == 0
    increments = {name: count - before.errors()[name] for name, count in after.errors().items()}
    assert increments == {name: int(name == reason) for name in REASONS}
    assert after.queue_series() == []
    assert after.jobstats_names() == {
        "jobstats_up",
        "jobstats_scrape_duration_seconds",
        "jobstats_scrape_errors_total",
        "jobstats_exporter_build_info",
    }
    assert api.requests - requests == 1
    lines = new_log_lines(exporter, mark, "scrape failed")
    assert len(lines) == 1, lines
    assert f"reason={reason}" in lines[0]
    assert MARKER not in lines[0]
    assert "Traceback" not in exporter.stderr_since(mark)


# Answers served, by the reason they must be counted under.
FAULTS = {
    "slow": (json_answer(marked(sample("enabled")), behaviour="slow"), "timeout"),
    "trickle": (json_answer(marked(sample("enabled")), behaviour="trickle"), "timeout"),
    "503_with_valid_body": (json_answer(marked(sample("enabled")), status=503), "http_status"),
    "404_with_valid_body": (json_answer(marked(sample("enabled")), status=404), "http_status"),
    "502_html": (html_answer(502), "http_status"),
    "200_html": (html_answer(200), "invalid_json"),
    # A 2xx whose body breaks off is an answer that is not JSON, not a network failure.
    "truncated": (json_answer(marked(sample("enabled")), behaviour="truncated"), "invalid_json"),
    "not_utf8": (
        Answer(
            body=b'{"success": true, "stats": {}, "message": "\xff\xfe' + MARKER.encode() + b'"}'
        ),
        "invalid_json",
    ),
    "undecodable_gzip": (
        Answer(
            body=MARKER.encode(),
            headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        ),
        "invalid_json",
    ),
    "json_array": (json_answer([marked(sample("enabled"))]), "invalid_payload"),
    "success_false": (json_answer({"success": False, "error": f"boom {MARKER}"}), "api_failure"),
    "success_string_true": (
        json_answer(marked({**sample("enabled"), "success": "true"})),
        "api_failure",
    ),
    "success_missing": (
        json_answer(marked({k: v for k, v in sample("enabled").items() if k != "success"})),
        "api_failure",
    ),
    "stats_missing": (
        json_answer(marked({k: v for k, v in sample("enabled").items() if k != "stats"})),
        "invalid_payload",
    ),
    "stats_not_an_object": (
        json_answer(marked({**sample("enabled"), "stats": [MARKER]})),
        "invalid_payload",
    ),
}


@pytest.mark.parametrize(("fault", "reason"), FAULTS.values(), ids=FAULTS.keys())
def test_upstream_fault_is_up_0_with_its_reason_and_no_queue_series(
    exporter: ExporterProcess, api: FakeStatsApi, fault: Answer, reason: str
) -> None:
    assert_scrape_reported_down(exporter, api, fault, reason)


@pytest.mark.parametrize("behaviour", ["trickle", "truncated", "slow"])
def test_scrape_after_a_broken_exchange_reads_the_next_answer(
    exporter: ExporterProcess, api: FakeStatsApi, behaviour: Behaviour
) -> None:
    api.answer(json_answer(sample("enabled"), behaviour=behaviour))
    assert scrape(exporter).value("jobstats_up") == 0
    api.answer(json_answer(sample("queue-paused")))

    recovered = scrape(exporter)

    assert recovered.value("jobstats_up") == 1
    assert recovered.value("jobstats_queue_jobs", queue="inventory", state="waiting") == 4


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_is_exported_with_its_exact_counts_and_status(
    exporter: ExporterProcess, api: FakeStatsApi, name: str
) -> None:
    document = sample(name)
    api.answer(json_answer(document))

    exposition = scrape(exporter)

    queues = sample_queues(document)
    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_redis_available") == int(document["redisAvailable"])
    assert exposition.value("jobstats_queues") == len(queues)
    assert exposition.value("jobstats_invalid_queues") == 0
    assert exposition.queues() == set(queues)
    for queue, entry in queues.items():
        counts = {
            sample.labels["state"]: sample.value
            for sample in exposition.series("jobstats_queue_jobs")
            if sample.labels["queue"] == queue
        }
        assert counts == {state: entry[state] for state in BASE_STATES}
        expected_status = entry["status"] if entry["status"] in STATUSES else "unknown"
        for status in STATUSES:
            one_hot = exposition.value("jobstats_queue_status", queue=queue, status=status)
            assert one_hot == int(status == expected_status)


def test_redis_down_answer_reports_no_queues(exporter: ExporterProcess, api: FakeStatsApi) -> None:
    api.answer(json_answer(sample("redis-down")))

    exposition = scrape(exporter)

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_redis_available") == 0
    assert exposition.value("jobstats_redis_enabled") == 0
    assert exposition.value("jobstats_queues") == 0
    assert [s for s in exposition.samples if s.name.startswith("jobstats_queue_")] == []


@pytest.mark.parametrize(
    ("name", "queue", "status"),
    [("queue-paused", "inventory", "paused"), ("worker-stopped", "product", "stopped")],
)
def test_paused_and_stopped_queues_show_only_their_status(
    exporter: ExporterProcess, api: FakeStatsApi, name: str, queue: str, status: str
) -> None:
    api.answer(json_answer(sample(name)))

    exposition = scrape(exporter)

    shown = {
        sample.labels["status"]: sample.value
        for sample in exposition.series("jobstats_queue_status")
        if sample.labels["queue"] == queue
    }
    assert shown == {"active": 0, "paused": 0, "stopped": 0, "unknown": 0, status: 1}


def test_each_scrape_makes_exactly_one_upstream_request(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    before = len(api.paths)

    for _ in range(3):
        assert scrape(exporter).value("jobstats_up") == 1

    assert api.paths[before:] == [STATS_PATH] * 3


def test_landing_page_and_health_endpoints_do_not_call_upstream(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    requests = api.requests

    answers = [exporter.get(path) for path in ("/", "/-/healthy", "/-/ready")]

    assert [status for status, _ in answers] == [200, 200, 200]
    assert b'href="/metrics"' in answers[0][1]
    assert api.requests == requests


def test_queue_added_upstream_appears_and_removed_one_disappears(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    document = sample("enabled")
    assert scrape(exporter).queues() == {"inventory", "product"}

    added = copy.deepcopy(document)
    added["stats"]["emails"] = {**document["stats"]["inventory"], "waiting": 7}
    api.answer(json_answer(added))
    with_emails = scrape(exporter)
    assert with_emails.queues() == {"inventory", "product", "emails"}
    assert with_emails.value("jobstats_queue_jobs", queue="emails", state="waiting") == 7

    removed = copy.deepcopy(added)
    del removed["stats"]["product"]
    api.answer(json_answer(removed))
    without_product = scrape(exporter)
    assert without_product.queues() == {"inventory", "emails"}
    assert without_product.samples_of_queue("product") == []
    assert without_product.value("jobstats_queues") == 2


def test_malformed_queue_is_skipped_and_logged_by_its_json_path(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    document = sample("enabled")
    document["stats"]["inventory"]["failed"] = "abc"
    api.answer(json_answer(document))
    mark = exporter.stderr_mark()

    exposition = scrape(exporter)

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_invalid_queues") == 1
    assert exposition.value("jobstats_queues") == 1
    assert exposition.queues() == {"product"}
    assert exposition.samples_of_queue("inventory") == []
    lines = new_log_lines(exporter, mark, "stats.inventory.failed")
    assert not any("Traceback" in line for line in lines)


ODD_QUEUE_NAMES = (
    'say "hi"',
    "back\\slash",
    "ends with a backslash\\",
    "two\nlines",
    "x\njobstats_up 0",
    'forged="label",queue="other"',
    "tab\tand\rcarriage return",
    "unicode ✓ café 队列 🚀",
    "{braces} # hash",
)


def odd_names_answer() -> Answer:
    document = sample("enabled")
    template = document["stats"]["inventory"]
    document["stats"] = {name: template for name in ODD_QUEUE_NAMES} | {"redisStatus": "enabled"}
    return json_answer(document)


def test_odd_queue_names_come_back_as_the_same_label_values(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    api.answer(odd_names_answer())

    exposition = scrape(exporter)

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_invalid_queues") == 0
    assert exposition.queues() == set(ODD_QUEUE_NAMES)
    assert exposition.value("jobstats_queues") == len(ODD_QUEUE_NAMES)


def test_prometheus_accept_header_gets_the_text_format_with_the_same_counts(
    exporter: ExporterProcess, api: FakeStatsApi
) -> None:
    # Prometheus accepts OpenMetrics and the text format; like client_golang by default, the
    # exporter answers in the text format, which it writes fastest.
    api.answer(json_answer(sample("queue-paused")))

    status, body = exporter.get("/metrics", {"Accept": PROMETHEUS_ACCEPT})

    assert status == 200
    exposition = Exposition.parse(body.decode("utf-8"), openmetrics=False)
    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_queue_jobs", queue="inventory", state="waiting") == 4
    assert exposition.value("jobstats_queue_status", queue="inventory", status="paused") == 1


PROMTOOL_SCENARIOS = {
    "enabled": lambda: json_answer(sample("enabled")),
    "redis_down": lambda: json_answer(sample("redis-down")),
    "odd_queue_names": odd_names_answer,
    "upstream_502": lambda: html_answer(502),
}


@pytest.mark.parametrize("scenario", PROMTOOL_SCENARIOS.values(), ids=PROMTOOL_SCENARIOS.keys())
def test_exposition_passes_promtool_check_metrics(
    exporter: ExporterProcess, api: FakeStatsApi, scenario: Callable[[], Answer]
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("JOBSTATS_REQUIRE_TOOLS"):
            pytest.fail("promtool is required (JOBSTATS_REQUIRE_TOOLS is set) but not installed")
        pytest.skip("promtool is not installed")
    api.answer(scenario())
    body = scrape_text(exporter)

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )

    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


@pytest.fixture(scope="module")
def refused_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """An exporter whose API URL, with credentials in it, points at a port nobody listens on."""
    url = f"http://scraper:{MARKER}@{HOST}:{free_port()}{STATS_PATH}?token={MARKER}"
    args = ["--api.url", url, "--api.timeout", API_TIMEOUT]
    with running_exporter(args, tmp_path_factory.mktemp("refused")) as process:
        yield process


def test_connection_refused_is_up_0_with_reason_connect(
    refused_exporter: ExporterProcess,
) -> None:
    first = scrape(refused_exporter)
    mark = refused_exporter.stderr_mark()

    second = scrape(refused_exporter)

    assert first.value("jobstats_up") == second.value("jobstats_up") == 0
    assert first.errors() == {reason: int(reason == "connect") for reason in REASONS}
    assert second.errors() == {reason: 2 * int(reason == "connect") for reason in REASONS}
    assert second.queue_series() == []
    lines = new_log_lines(refused_exporter, mark, "scrape failed")
    assert len(lines) == 1, lines
    assert "reason=connect" in lines[0]


def test_credentials_in_the_api_url_appear_in_no_log_nor_page(
    refused_exporter: ExporterProcess,
) -> None:
    scrape(refused_exporter)
    status, page = refused_exporter.get("/")

    assert status == 200
    assert MARKER.encode() not in page
    assert "scrape failed" in refused_exporter.stderr()
    assert MARKER not in refused_exporter.stderr()


def oversized_answer(behaviour: Behaviour) -> Answer:
    """A 2 KiB answer, with or without its Content-Length."""
    document = marked(sample("enabled"))
    document["padding"] = "x" * 2048
    return json_answer(document, behaviour=behaviour)


def compressed_bomb() -> Answer:
    """Under 1 KiB on the wire, 200 KiB once decompressed."""
    body = gzip.compress(json.dumps(marked(sample("enabled"))).encode() + b" " * 200 * 1024)
    assert len(body) < 1024
    return Answer(
        body=body,
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
    )


OVERSIZED = {
    "declared_length": lambda: oversized_answer("normal"),
    "undeclared_length": lambda: oversized_answer("undeclared"),
    "compressed_bomb": compressed_bomb,
}


@pytest.mark.parametrize("oversized", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_body_over_the_size_cap_is_too_large(
    api: FakeStatsApi, tmp_path: Path, oversized: Callable[[], Answer]
) -> None:
    args = ["--api.url", api.url, "--api.timeout", API_TIMEOUT, "--api.max-body-size", "1KiB"]

    with running_exporter(args, tmp_path) as capped:
        assert_scrape_reported_down(capped, api, oversized(), "too_large")


def test_listen_address_in_use_exits_1_with_one_line(fake_api: FakeStatsApi) -> None:
    taken = f"{HOST}:{fake_api.port}"

    result = run_exporter("--web.listen-address", taken, "--api.url", fake_api.url)

    assert result.returncode == 1
    lines = result.stderr.strip().split("\n")
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on {taken}" in lines[0]


def test_prometheus_scrape_timeout_header_bounds_the_upstream_timeout(
    api: FakeStatsApi, tmp_path: Path
) -> None:
    args = ["--api.url", api.url, "--api.timeout", "10s"]
    slow = json_answer(marked(sample("enabled")), behaviour="slow", delay=3.0)

    with running_exporter(args, tmp_path) as patient:
        assert_scrape_reported_down(
            patient, api, slow, "timeout", headers={"X-Prometheus-Scrape-Timeout-Seconds": "1"}
        )


def test_check_prints_the_card_of_the_answer(api: FakeStatsApi) -> None:
    document = sample("enabled")
    requests = api.requests

    result = run_exporter("check", "--api.url", api.url, "--api.timeout", "5s")

    assert result.returncode == 0, result.stderr
    assert api.requests - requests == 1
    assert "Every 6 minutes" in result.stdout
    for queue, entry in sample_queues(document).items():
        counts = r"\s+".join(rf"{state}\s+{entry[state]}\b" for state in BASE_STATES)
        assert re.search(rf"^{queue}\b.*\n\s*{counts}", result.stdout, re.MULTILINE), (
            f"{queue}'s counts not shown in:\n{result.stdout}"
        )


def test_check_against_a_down_api_fails_with_one_line() -> None:
    result = run_exporter("check", "--api.url", closed_port_url(), "--api.timeout", "1s")

    assert result.returncode != 0
    assert len(result.stderr.strip().split("\n")) == 1, result.stderr
    assert "connect" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_good_flags_and_file(tmp_path: Path) -> None:
    config = tmp_path / "good.yml"
    config.write_text(
        f"api:\n  url: {closed_port_url()}\n  timeout: 2s\n"
        f"web:\n  listen_address: {HOST}:{free_port()}\n",
        encoding="utf-8",
    )

    from_flags = run_exporter(
        "--api.url", closed_port_url(), "--api.timeout", "1s", "--config.check"
    )
    from_file = run_exporter("--config.file", str(config), "--config.check")

    assert (from_flags.returncode, from_flags.stderr) == (0, "")
    assert (from_file.returncode, from_file.stderr) == (0, "")


@pytest.mark.parametrize(
    ("yaml", "args", "key"),
    [
        (None, ["--api.timeout", "abc"], "api.timeout"),
        ("api:\n  urll: http://127.0.0.1:9/api/jobs/stats\n", [], "api.urll"),
    ],
    ids=["bad_timeout_flag", "unknown_yaml_key"],
)
def test_config_check_rejects_bad_config_with_one_line_naming_the_key(
    tmp_path: Path, yaml: str | None, args: list[str], key: str
) -> None:
    if yaml is not None:
        config = tmp_path / "bad.yml"
        config.write_text(yaml, encoding="utf-8")
        args = [*args, "--config.file", str(config)]

    result = run_exporter(*args, "--config.check")

    assert result.returncode == 2
    lines = result.stderr.strip().split("\n")
    assert len(lines) == 1, result.stderr
    assert key in lines[0]


def test_demo_serves_simulated_queues_and_stops_cleanly(tmp_path: Path) -> None:
    def simulated_queues_served() -> bool:
        exposition = scrape(demo)
        return exposition.value("jobstats_up") == 1 and exposition.queues() != set()

    with running_exporter([], tmp_path, command=["demo"]) as demo:
        wait_until(simulated_queues_served, PATIENCE, "the demo to export queues")
        returncode = demo.stop()

    assert returncode == 0
    assert "Traceback" not in demo.stderr()


def test_sigterm_stops_the_exporter_with_status_0(api: FakeStatsApi, tmp_path: Path) -> None:
    args = ["--api.url", api.url, "--api.timeout", API_TIMEOUT]
    with running_exporter(args, tmp_path) as process:
        # Prometheus keeps its connection open between scrapes; shutdown must not wait on it.
        idle = HTTPConnection(HOST, process.port, timeout=10)
        try:
            idle.request("GET", "/metrics")
            with idle.getresponse() as response:
                assert response.status == 200
                response.read()
            process.process.terminate()
            returncode = process.process.wait(timeout=10)
        finally:
            idle.close()

    assert returncode == 0
    assert "Traceback" not in process.stderr()


def test_sigterm_during_a_scrape_stops_the_exporter_with_status_0(
    api: FakeStatsApi, tmp_path: Path
) -> None:
    api.answer(json_answer(sample("enabled"), behaviour="slow", delay=5.0))
    args = ["--api.url", api.url, "--api.timeout", "10s"]
    with running_exporter(args, tmp_path) as process:
        requests = api.requests
        with socket.create_connection((HOST, process.port), timeout=10) as scraper:
            scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n")
            wait_until(lambda: api.requests > requests, PATIENCE, "the scrape to reach upstream")
            process.process.terminate()
            returncode = process.process.wait(timeout=10)

    assert returncode == 0
    assert "Traceback" not in process.stderr()


# --- The runbooks the alert rules link to --------------------------------------------

RULES = Path(__file__).resolve().parent.parent / "alerts" / "jobstats.rules.yml"


class ElementIds(HTMLParser):
    """The id attributes of an HTML page's elements."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name == "id" and value)


def rule_runbook_anchors() -> dict[str, str]:
    """Each alert of the shipped rules, and the fragment of its runbook_url."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {
        rule["alert"]: rule["annotations"]["runbook_url"].partition("#")[2]
        for group in groups
        for rule in group["rules"]
        if "alert" in rule
    }


def test_runbooks_page_has_the_section_of_every_alert(exporter: ExporterProcess) -> None:
    status, body = exporter.get("/runbooks")
    page = ElementIds()
    page.feed(body.decode("utf-8"))

    assert status == 200
    missing = {
        alert: anchor for alert, anchor in rule_runbook_anchors().items() if anchor not in page.ids
    }
    assert missing == {}


def test_runbooks_need_the_credentials_of_the_web_config(
    fake_api: FakeStatsApi, tmp_path: Path
) -> None:
    password = "runbook-SECRET-5d1e"
    web_config = tmp_path / "web-config.yml"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config.write_text(yaml.safe_dump({"basic_auth_users": {"oncall": hashed}}), "utf-8")
    credentials = base64.b64encode(f"oncall:{password}".encode()).decode()
    args = ["--api.url", fake_api.url, "--web.config.file", str(web_config)]

    with running_exporter(args, tmp_path) as exporter:
        anonymous, _ = exporter.get("/runbooks")
        wrong, _ = exporter.get("/runbooks", {"Authorization": "Basic b25jYWxsOm5vcGU="})
        allowed, body = exporter.get("/runbooks", {"Authorization": f"Basic {credentials}"})

    assert (anonymous, wrong, allowed) == (401, 401, 200)
    assert b'id="jobstatsexporterdown"' in body
