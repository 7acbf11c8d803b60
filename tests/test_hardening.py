"""Integration: many targets, a protected backend and secured endpoints, end to end.

The exporter runs as a real process on a config file each fixture writes; every
upstream is a FakeStatsApi on 127.0.0.1 (over TLS where a test says so) that counts
the requests it receives, so "no request left the exporter" is observed, not assumed.
Certificates come from a test CA made here with trustme. Nothing listens or connects
beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import bcrypt
import pytest
import trustme
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from alerting_stack import poll, prometheus_query, require_tool, running_prometheus
from samples import sample
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
    http_get,
    running_exporter,
    wait_until,
)

pytestmark = pytest.mark.integration

#: How long a test waits for something the exporter or an upstream does.
PATIENCE = 20.0
REASONS = (
    "timeout",
    "connect",
    "http_status",
    "invalid_json",
    "invalid_payload",
    "api_failure",
    "too_large",
)


# --- Reading what the exporter serves -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exposition:
    """One scrape's samples, as Prometheus' text format parser reads them."""

    samples: tuple[Sample, ...]

    @classmethod
    def parse(cls, body: bytes) -> Exposition:
        families = text_string_to_metric_families(body.decode("utf-8"))
        return cls(tuple(sample for family in families for sample in family.samples))

    def value(self, name: str, **labels: str) -> float:
        """The value of the one series `name{labels}` (labels compared exactly)."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0]

    def queues(self) -> set[str]:
        return {s.labels["queue"] for s in self.samples if s.name == "jobstats_queue_jobs"}

    def errors(self) -> dict[str, float]:
        return {
            s.labels["reason"]: s.value
            for s in self.samples
            if s.name == "jobstats_scrape_errors_total"
        }

    def states_of(self, queue: str) -> dict[str, float]:
        return {
            s.labels["state"]: s.value
            for s in self.samples
            if s.name == "jobstats_queue_jobs" and s.labels["queue"] == queue
        }


def scrape(exporter: ExporterProcess, path: str) -> Exposition:
    status, body = exporter.get(path)
    assert status == 200, body
    return Exposition.parse(body)


def probe(exporter: ExporterProcess, target: str) -> Exposition:
    return scrape(exporter, f"/probe?target={target}")


def json_answer(document: Any, behaviour: Behaviour = "normal") -> Answer:
    return Answer(body=json.dumps(document).encode(), behaviour=behaviour)


def write_config(folder: Path, document: Mapping[str, Any]) -> Path:
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def config_args(config: Path) -> list[str]:
    return ["--config.file", str(config)]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def assert_no_traceback(exporter: ExporterProcess) -> None:
    assert "Traceback" not in exporter.stderr() + exporter.stdout()


# --- /metrics and /probe over several targets -----------------------------------------


@pytest.fixture(scope="module")
def first_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def second_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("queue-paused"))) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def bait_api() -> Iterator[FakeStatsApi]:
    """An API that no target names: whatever a caller asks, it must hear nothing."""
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api
    assert api.requests == 0


@pytest.fixture(scope="module")
def probe_exporter(
    first_api: FakeStatsApi, second_api: FakeStatsApi, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExporterProcess]:
    folder = tmp_path_factory.mktemp("probe")
    config = write_config(
        folder,
        {
            "api": {"timeout": "5s"},
            "targets": [
                {"name": "first", "url": first_api.url},
                {"name": "second", "url": second_api.url},
            ],
        },
    )
    with running_exporter(config_args(config), folder) as exporter:
        yield exporter
    assert_no_traceback(exporter)


#: Queries /probe must refuse; {bait} and {first} stand for upstream URLs.
REFUSED_PROBES = {
    "unknown_name": "target=nonexistent",
    "url_of_an_unlisted_api": "target={bait}",
    "url_of_an_unlisted_api_percent_encoded": "target={bait_encoded}",
    "url_of_a_listed_api": "target={first}",
    "no_query": "",
    "other_parameter": "module=first",
    "empty_target": "target=",
    "two_targets": "target=first&target=second",
    "same_target_twice": "target=first&target=first",
}


@pytest.mark.parametrize("query", REFUSED_PROBES.values(), ids=REFUSED_PROBES.keys())
def test_probe_refuses_what_is_not_one_configured_target_and_sends_no_request(
    probe_exporter: ExporterProcess,
    first_api: FakeStatsApi,
    second_api: FakeStatsApi,
    bait_api: FakeStatsApi,
    query: str,
) -> None:
    query = query.format(
        bait=bait_api.url, bait_encoded=quote(bait_api.url, safe=""), first=first_api.url
    )
    before = (first_api.requests, second_api.requests)

    status, body = probe_exporter.get(f"/probe?{query}" if query else "/probe")

    assert status == 400, body
    assert (first_api.requests, second_api.requests) == before
    assert bait_api.requests == 0
    assert b"127.0.0.1" not in body


def test_probe_of_a_configured_target_reads_that_target_only(
    probe_exporter: ExporterProcess, first_api: FakeStatsApi, second_api: FakeStatsApi
) -> None:
    before = (first_api.requests, second_api.requests)

    exposition = probe(probe_exporter, "second")

    assert exposition.value("jobstats_up") == 1
    # queue-paused.json is what only the second API answers.
    assert exposition.value("jobstats_queue_status", queue="inventory", status="paused") == 1
    assert (first_api.requests, second_api.requests) == (before[0], before[1] + 1)


def test_metrics_serves_the_first_target(
    probe_exporter: ExporterProcess, first_api: FakeStatsApi, second_api: FakeStatsApi
) -> None:
    before = (first_api.requests, second_api.requests)

    exposition = scrape(probe_exporter, "/metrics")

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_queue_status", queue="inventory", status="active") == 1
    assert (first_api.requests, second_api.requests) == (before[0] + 1, before[1])


def test_two_targets_each_read_their_own_upstream(
    probe_exporter: ExporterProcess, first_api: FakeStatsApi, second_api: FakeStatsApi
) -> None:
    first_paths, second_paths = len(first_api.paths), len(second_api.paths)

    for target in ("first", "second", "second", "first", "second"):
        assert probe(probe_exporter, target).value("jobstats_up") == 1

    assert first_api.paths[first_paths:] == [STATS_PATH] * 2
    assert second_api.paths[second_paths:] == [STATS_PATH] * 3


# --- Protecting the backend: shared in-flight requests and min_interval ---------------


@pytest.fixture(scope="module")
def gated_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def cached_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api


@pytest.fixture(scope="module")
def fresh_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api


@pytest.fixture(scope="module")
def protecting_exporter(
    gated_api: FakeStatsApi,
    cached_api: FakeStatsApi,
    fresh_api: FakeStatsApi,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ExporterProcess]:
    folder = tmp_path_factory.mktemp("protect")
    config = write_config(
        folder,
        {
            "api": {"timeout": "15s"},
            "targets": [
                {"name": "shared", "url": gated_api.url},
                {"name": "cached", "url": cached_api.url, "min_interval": "30s"},
                {"name": "fresh", "url": fresh_api.url},
            ],
        },
    )
    with running_exporter(config_args(config), folder) as exporter:
        yield exporter
    assert_no_traceback(exporter)


class Scraper(threading.Thread):
    """One scrape in its own thread; `sent` is set once its request has left."""

    def __init__(self, port: int, path: str) -> None:
        super().__init__(name=f"scraper {path}")
        self.port = port
        self.path = path
        self.sent = threading.Event()
        self.status = 0
        self.body = b""
        self.error: Exception | None = None

    def run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=PATIENCE)
        try:
            connection.request("GET", self.path)
            self.sent.set()
            with connection.getresponse() as response:
                self.status, self.body = response.status, response.read()
        except Exception as error:  # noqa: BLE001 - handed to the test, which fails on it
            self.error = error
        finally:
            self.sent.set()
            connection.close()


def requests_read_by(port: int) -> int:
    """Connections to 127.0.0.1:`port` whose request the server has read (Linux /proc).

    An established server-side socket with nothing left in its receive queue, once
    the client has sent, is one whose request the server's thread has taken in.
    """
    read = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        established = fields[3] == "01"
        receive_queue = int(fields[4].split(":")[1], 16)
        if local_port == port and established and receive_queue == 0:
            read += 1
    return read


def test_concurrent_scrapes_of_one_target_share_one_upstream_request(
    protecting_exporter: ExporterProcess, gated_api: FakeStatsApi
) -> None:
    before = gated_api.requests
    scrapers = [Scraper(protecting_exporter.port, "/probe?target=shared") for _ in range(8)]
    gated_api.hold()
    try:
        for scraper in scrapers:
            scraper.start()
        wait_until(
            lambda: all(scraper.sent.is_set() for scraper in scrapers),
            PATIENCE,
            "the 8 scrapes to be sent",
        )
        wait_until(lambda: gated_api.held >= 1, PATIENCE, "a request held at the upstream")
        # Every scrape has reached the exporter before the upstream answers.
        wait_until(
            lambda: requests_read_by(protecting_exporter.port) >= len(scrapers),
            PATIENCE,
            "the exporter to read the 8 scrapes",
        )
    finally:
        gated_api.release()
        for scraper in scrapers:
            scraper.join(PATIENCE)

    assert [scraper.error for scraper in scrapers] == [None] * 8
    assert [scraper.status for scraper in scrapers] == [200] * 8
    assert [Exposition.parse(s.body).value("jobstats_up") for s in scrapers] == [1] * 8
    assert gated_api.requests - before == 1

    assert probe(protecting_exporter, "shared").value("jobstats_up") == 1
    assert gated_api.requests - before == 2


def test_min_interval_answers_from_the_last_result_and_exports_its_age(
    protecting_exporter: ExporterProcess, cached_api: FakeStatsApi
) -> None:
    first = probe(protecting_exporter, "cached")
    # What the API says now must not show while the last result is younger than 30 s.
    cached_api.answer(json_answer(sample("queue-paused")))
    later = [probe(protecting_exporter, "cached") for _ in range(2)]

    assert cached_api.requests == 1
    assert first.value("jobstats_result_age_seconds") == 0
    for exposition in later:
        assert exposition.value("jobstats_up") == 1
        assert exposition.value("jobstats_result_age_seconds") > 0
        assert exposition.value("jobstats_queue_status", queue="inventory", status="active") == 1


def test_without_min_interval_every_scrape_reads_the_upstream(
    protecting_exporter: ExporterProcess, fresh_api: FakeStatsApi
) -> None:
    before = fresh_api.requests

    expositions = [probe(protecting_exporter, "fresh") for _ in range(3)]

    assert fresh_api.requests - before == 3
    assert [e.value("jobstats_result_age_seconds") for e in expositions] == [0, 0, 0]


# --- Upstream credentials -------------------------------------------------------------

BEARER_TOKEN = "bearer-SECRET-4b1d9e2a"
ROTATED_TOKEN = "rotated-SECRET-70c3e5b8"
WRONG_TOKEN = "wrong-bearer-SECRET-5d0e11"
USERNAME = "monitoring"
PASSWORD = "basic-SECRET-8c2f71d4"
WRONG_PASSWORD = "wrong-basic-SECRET-93ab06"
FILE_HEADER_SECRET = "file-header-SECRET-31aa0c"
ENV_HEADER_SECRET = "env-header-SECRET-c47d22"
#: Everything that must never show in a log line, a page or an exposition.
SECRETS = (
    BEARER_TOKEN,
    ROTATED_TOKEN,
    WRONG_TOKEN,
    PASSWORD,
    WRONG_PASSWORD,
    FILE_HEADER_SECRET,
    ENV_HEADER_SECRET,
    basic(USERNAME, PASSWORD).removeprefix("Basic "),
    basic(USERNAME, WRONG_PASSWORD).removeprefix("Basic "),
)
AUTH_TARGETS = ("bearer", "basic", "headers", "wrong_bearer", "wrong_basic")
#: Two halves of a secret with a line break inside, which no HTTP header can carry.
BROKEN_HEAD = "broken-SECRET-head-6e12"
BROKEN_TAIL = "broken-SECRET-tail-a90f"


@pytest.fixture(scope="module")
def bearer_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(
        json_answer(sample("enabled")), authorization=f"Bearer {BEARER_TOKEN}"
    ) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def basic_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(
        json_answer(sample("enabled")), authorization=basic(USERNAME, PASSWORD)
    ) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def headers_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api


@pytest.fixture(scope="module")
def auth_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The auth exporter's config, secret files and logs."""
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def token_file(auth_folder: Path) -> Path:
    path = auth_folder / "token"
    # As `echo` and editors write it: the newline is not part of the token.
    path.write_text(f"{BEARER_TOKEN}\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def auth_exporter(
    bearer_api: FakeStatsApi,
    basic_api: FakeStatsApi,
    headers_api: FakeStatsApi,
    token_file: Path,
    auth_folder: Path,
) -> Iterator[ExporterProcess]:
    folder = auth_folder
    (folder / "wrong_token").write_text(f"{WRONG_TOKEN}\n", encoding="utf-8")
    (folder / "api_key").write_text(f"{FILE_HEADER_SECRET}\n", encoding="utf-8")
    (folder / "rotating_token").write_text(f"{BEARER_TOKEN}\n", encoding="utf-8")
    config = write_config(
        folder,
        {
            "api": {"timeout": "5s"},
            "log": {"level": "debug"},
            "targets": [
                {"name": "bearer", "url": bearer_api.url, "bearer_token_file": token_file.name},
                {
                    "name": "basic",
                    "url": basic_api.url,
                    "basic_auth": {"username": USERNAME, "password_env": "HARDENING_PASSWORD"},
                },
                {
                    "name": "headers",
                    "url": headers_api.url,
                    "headers": {
                        "X-Shop-Region": "eu-west",
                        # Relative: read from the config file's folder.
                        "X-Api-Key": {"file": "api_key"},
                        "X-Env-Key": {"env": "HARDENING_HEADER"},
                    },
                },
                {"name": "wrong_bearer", "url": bearer_api.url, "bearer_token_file": "wrong_token"},
                {
                    "name": "wrong_basic",
                    "url": basic_api.url,
                    "basic_auth": {"username": USERNAME, "password_env": "HARDENING_WRONG"},
                },
                {
                    "name": "rotating",
                    "url": headers_api.url,
                    "bearer_token_file": "rotating_token",
                },
            ],
        },
    )
    env = {
        "HARDENING_PASSWORD": PASSWORD,
        "HARDENING_WRONG": WRONG_PASSWORD,
        "HARDENING_HEADER": ENV_HEADER_SECRET,
    }
    with running_exporter(config_args(config), folder, env=env) as exporter:
        yield exporter
    assert_no_traceback(exporter)


def test_bearer_token_from_a_file_is_sent_without_its_trailing_newline(
    auth_exporter: ExporterProcess, bearer_api: FakeStatsApi
) -> None:
    exposition = probe(auth_exporter, "bearer")

    assert exposition.value("jobstats_up") == 1
    assert bearer_api.header_values("Authorization")[-1] == f"Bearer {BEARER_TOKEN}"


def test_bearer_token_file_is_read_again_at_each_request(
    auth_exporter: ExporterProcess, bearer_api: FakeStatsApi, token_file: Path
) -> None:
    token_file.write_text(f"{ROTATED_TOKEN}\n", encoding="utf-8")
    bearer_api.expect_authorization(f"Bearer {ROTATED_TOKEN}")
    try:
        exposition = probe(auth_exporter, "bearer")
    finally:
        token_file.write_text(f"{BEARER_TOKEN}\n", encoding="utf-8")
        bearer_api.expect_authorization(f"Bearer {BEARER_TOKEN}")

    assert exposition.value("jobstats_up") == 1
    assert bearer_api.header_values("Authorization")[-1] == f"Bearer {ROTATED_TOKEN}"


def test_basic_auth_with_the_password_from_a_variable_passes(
    auth_exporter: ExporterProcess, basic_api: FakeStatsApi
) -> None:
    exposition = probe(auth_exporter, "basic")

    assert exposition.value("jobstats_up") == 1
    assert basic_api.header_values("Authorization")[-1] == basic(USERNAME, PASSWORD)


def test_extra_headers_plain_from_a_file_and_from_a_variable_are_sent(
    auth_exporter: ExporterProcess, headers_api: FakeStatsApi
) -> None:
    exposition = probe(auth_exporter, "headers")

    assert exposition.value("jobstats_up") == 1
    assert headers_api.header_values("X-Shop-Region")[-1] == "eu-west"
    assert headers_api.header_values("X-Api-Key")[-1] == FILE_HEADER_SECRET
    assert headers_api.header_values("X-Env-Key")[-1] == ENV_HEADER_SECRET
    assert headers_api.header_values("Authorization")[-1] is None


@pytest.mark.parametrize(
    ("target", "api_fixture", "sent"),
    [
        ("wrong_bearer", "bearer_api", f"Bearer {WRONG_TOKEN}"),
        ("wrong_basic", "basic_api", basic(USERNAME, WRONG_PASSWORD)),
    ],
)
def test_wrong_credentials_get_401_and_up_0_with_reason_http_status(
    auth_exporter: ExporterProcess,
    request: pytest.FixtureRequest,
    target: str,
    api_fixture: str,
    sent: str,
) -> None:
    api: FakeStatsApi = request.getfixturevalue(api_fixture)
    before_errors = probe(auth_exporter, target).errors()
    requests = api.requests

    exposition = probe(auth_exporter, target)

    assert exposition.value("jobstats_up") == 0
    increments = {r: n - before_errors[r] for r, n in exposition.errors().items()}
    assert increments == {reason: int(reason == "http_status") for reason in REASONS}
    assert api.requests - requests == 1
    assert api.header_values("Authorization")[-1] == sent


def test_no_credential_appears_in_logs_pages_or_expositions(
    auth_exporter: ExporterProcess,
) -> None:
    answers = [auth_exporter.get(f"/probe?target={target}") for target in AUTH_TARGETS]
    answers += [auth_exporter.get(path) for path in ("/metrics", "/", "/probe?target=nonexistent")]

    assert [status for status, _ in answers] == [200] * 7 + [400]
    logs = auth_exporter.stderr() + auth_exporter.stdout()
    # The failed scrapes were logged: the log was written, and it is clean.
    assert logs.count("scrape failed") >= 2
    for secret in SECRETS:
        assert secret not in logs
        for _, body in answers:
            assert secret.encode() not in body


def test_a_token_file_rotated_to_two_lines_is_up_0_and_never_logged(
    auth_exporter: ExporterProcess, headers_api: FakeStatsApi, auth_folder: Path
) -> None:
    token = auth_folder / "rotating_token"
    assert probe(auth_exporter, "rotating").value("jobstats_up") == 1
    requests = headers_api.requests
    mark = auth_exporter.stderr_mark()
    # A line break inside: no HTTP header can carry it, and httpx's error would quote it.
    token.write_text(f"{BROKEN_HEAD}\n{BROKEN_TAIL}\n", encoding="utf-8")
    try:
        status, body = auth_exporter.get("/probe?target=rotating")
    finally:
        token.write_text(f"{BEARER_TOKEN}\n", encoding="utf-8")

    assert status == 200, body
    assert Exposition.parse(body).value("jobstats_up") == 0
    assert headers_api.requests == requests
    logged = auth_exporter.stderr_since(mark)
    assert "scrape failed" in logged
    for half in (BROKEN_HEAD, BROKEN_TAIL):
        assert half not in logged + auth_exporter.stdout()
        assert half.encode() not in body


@pytest.mark.parametrize("setting", ["bearer_token_env", "header_env"])
def test_a_variable_secret_with_a_line_break_is_refused_without_showing_it(
    tmp_path: Path, setting: str
) -> None:
    target: dict[str, Any] = {"name": "shop", "url": f"http://{HOST}:{free_port()}{STATS_PATH}"}
    if setting == "bearer_token_env":
        target["bearer_token_env"] = "HARDENING_BROKEN"
    else:
        target["headers"] = {"X-Api-Key": {"env": "HARDENING_BROKEN"}}
    config = write_config(tmp_path, {"targets": [target]})

    result = subprocess.run(
        exporter_command(*config_args(config), "--config.check"),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment() | {"HARDENING_BROKEN": f"{BROKEN_HEAD}\n{BROKEN_TAIL}"},
        check=False,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "HARDENING_BROKEN" in result.stderr
    for half in (BROKEN_HEAD, BROKEN_TAIL):
        assert half not in result.stdout + result.stderr


# --- Upstream TLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_api(ca: trustme.CA) -> Iterator[FakeStatsApi]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(context)
    with FakeStatsApi(json_answer(sample("enabled")), tls=context) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture(scope="module")
def tls_exporter(
    tls_api: FakeStatsApi, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExporterProcess]:
    folder = tmp_path_factory.mktemp("upstream-tls")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    config = write_config(
        folder,
        {
            "api": {"timeout": "5s"},
            "targets": [
                {"name": "with_ca", "url": tls_api.url, "tls": {"ca_file": "ca.pem"}},
                {"name": "without_ca", "url": tls_api.url},
                {
                    "name": "skip_verify",
                    "url": tls_api.url,
                    "tls": {"insecure_skip_verify": True},
                },
            ],
        },
    )
    with running_exporter(config_args(config), folder) as exporter:
        yield exporter
    assert_no_traceback(exporter)


@pytest.mark.parametrize("target", ["with_ca", "skip_verify"])
def test_tls_upstream_is_read_with_its_ca_or_with_verification_off(
    tls_exporter: ExporterProcess, tls_api: FakeStatsApi, target: str
) -> None:
    assert tls_api.url.startswith("https://")
    requests = tls_api.requests

    exposition = probe(tls_exporter, target)

    assert exposition.value("jobstats_up") == 1
    assert exposition.queues() == {"inventory", "product"}
    assert tls_api.requests - requests == 1


def test_tls_upstream_with_an_unknown_ca_is_up_0_with_reason_connect(
    tls_exporter: ExporterProcess, tls_api: FakeStatsApi
) -> None:
    requests, refused = tls_api.requests, tls_api.tls_failures

    exposition = probe(tls_exporter, "without_ca")

    assert exposition.value("jobstats_up") == 0
    assert exposition.errors() == {reason: int(reason == "connect") for reason in REASONS}
    assert tls_api.requests == requests
    # The exporter reached the API and refused its certificate: the handshake broke off.
    wait_until(lambda: tls_api.tls_failures > refused, PATIENCE, "the refused handshake")


# --- The exporter's own endpoints behind TLS and basic auth ---------------------------

WEB_USER = "prometheus"
WEB_PASSWORD = "web-SECRET-2e9f4c71"


@dataclass(frozen=True, slots=True)
class SecuredExporter:
    process: ExporterProcess
    web_config: Path
    client_tls: ssl.SSLContext


@pytest.fixture(scope="module")
def web_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api


def write_web_config(folder: Path, ca: trustme.CA, tls: Mapping[str, str], **settings: Any) -> Path:
    """web-config.yml in `folder`: TLS with a server certificate for HOST from `ca` (and
    the `tls` settings besides), and any other top-level `settings`."""
    certificate = ca.issue_cert(HOST)
    certificate.cert_chain_pems[0].write_to_path(str(folder / "server.crt"))
    certificate.private_key_pem.write_to_path(str(folder / "server.key"))
    server = {"cert_file": str(folder / "server.crt"), "key_file": str(folder / "server.key")}
    web_config = folder / "web-config.yml"
    web_config.write_text(
        yaml.safe_dump({"tls_server_config": {**server, **tls}, **settings}), encoding="utf-8"
    )
    return web_config


@pytest.fixture(scope="module")
def secured(
    web_api: FakeStatsApi, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecuredExporter]:
    folder = tmp_path_factory.mktemp("web")
    hashed = bcrypt.hashpw(WEB_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web_config = write_web_config(folder, ca, {}, basic_auth_users={WEB_USER: hashed})
    config = write_config(
        folder,
        {"log": {"level": "debug"}, "targets": [{"name": "shop", "url": web_api.url}]},
    )
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    args = [*config_args(config), "--web.config.file", str(web_config)]
    # A connection the exporter forgets to close shows as a ResourceWarning in its log.
    env = {"PYTHONWARNINGS": "always::ResourceWarning"}
    with running_exporter(args, folder, env=env, tls=client_tls) as exporter:
        yield SecuredExporter(exporter, web_config, client_tls)
    assert_no_traceback(exporter)


def https_get(
    secured: SecuredExporter, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET over HTTPS, checked against the test CA; status, headers and body."""
    connection = http.client.HTTPSConnection(
        HOST, secured.process.port, timeout=PATIENCE, context=secured.client_tls
    )
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        with connection.getresponse() as response:
            return response.status, response.headers, response.read()
    finally:
        connection.close()


# RFC 7235: the scheme's name is case-insensitive.
@pytest.mark.parametrize("scheme", ["Basic", "basic"])
@pytest.mark.parametrize("path", ["/metrics", "/probe?target=shop"])
def test_right_credentials_over_tls_get_the_metrics(
    secured: SecuredExporter, web_api: FakeStatsApi, path: str, scheme: str
) -> None:
    requests = web_api.requests
    credentials = basic(WEB_USER, WEB_PASSWORD).replace("Basic", scheme, 1)

    status, _, body = https_get(secured, path, {"Authorization": credentials})

    assert status == 200, body
    assert Exposition.parse(body).value("jobstats_up") == 1
    assert web_api.requests - requests == 1


UNAUTHORIZED = {
    "wrong_password": {"Authorization": basic(WEB_USER, "not-the-password")},
    "unknown_user": {"Authorization": basic("mallory", WEB_PASSWORD)},
    "no_credentials": {},
    "bearer_instead_of_basic": {"Authorization": f"Bearer {WEB_PASSWORD}"},
    "not_base64": {"Authorization": "Basic %%%"},
}


@pytest.mark.parametrize("headers", UNAUTHORIZED.values(), ids=UNAUTHORIZED.keys())
@pytest.mark.parametrize("path", ["/metrics", "/probe?target=shop", "/"])
def test_missing_or_wrong_credentials_get_401_and_no_upstream_request(
    secured: SecuredExporter, web_api: FakeStatsApi, path: str, headers: dict[str, str]
) -> None:
    requests = web_api.requests

    status, answer_headers, body = https_get(secured, path, headers)

    assert status == 401
    assert (answer_headers.get("WWW-Authenticate") or "").startswith("Basic")
    assert b"jobstats_" not in body
    assert web_api.requests == requests


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready"])
def test_health_endpoints_stay_open_without_credentials(
    secured: SecuredExporter, path: str
) -> None:
    status, _, _ = https_get(secured, path)

    assert status == 200


def test_plain_http_to_the_tls_exporter_gets_no_answer(secured: SecuredExporter) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        http_get(secured.process.port, "/metrics", {"Authorization": basic(WEB_USER, "x")})


def test_exporter_closes_each_tls_connection_it_served(secured: SecuredExporter) -> None:
    mark = secured.process.stderr_mark()
    answer = b""
    with (
        socket.create_connection((HOST, secured.process.port), timeout=PATIENCE) as plain,
        secured.client_tls.wrap_socket(plain, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\nConnection: close\r\n\r\n")
        # Read to the end: the exporter is done with the connection once it is closed.
        while chunk := tls.recv(65536):
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 200")
    assert "ResourceWarning" not in secured.process.stderr_since(mark)


def test_web_password_appears_in_no_log_line(secured: SecuredExporter) -> None:
    right = https_get(secured, "/metrics", {"Authorization": basic(WEB_USER, WEB_PASSWORD)})
    wrong = https_get(secured, "/metrics", {"Authorization": f"Bearer {WEB_PASSWORD}"})

    assert (right[0], wrong[0]) == (200, 401)
    logs = secured.process.stderr() + secured.process.stdout()
    assert "listening" in logs
    for secret in (WEB_PASSWORD, basic(WEB_USER, WEB_PASSWORD).removeprefix("Basic ")):
        assert secret not in logs
        assert secret.encode() not in wrong[2]


def run_healthcheck(port: int, web_config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        exporter_command(
            "healthcheck",
            "--web.listen-address",
            f"{HOST}:{port}",
            "--web.config.file",
            str(web_config),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )


def test_healthcheck_command_exits_0_against_the_tls_exporter(secured: SecuredExporter) -> None:
    healthy = run_healthcheck(secured.process.port, secured.web_config)
    nobody = run_healthcheck(free_port(), secured.web_config)

    assert healthy.returncode == 0, healthy.stderr
    assert nobody.returncode != 0


# --- Limits end to end ----------------------------------------------------------------

MAX_QUEUES = 100
MAX_NAME = 200
MAX_EXTRA_STATES = 2


@pytest.fixture(scope="module")
def limits_api() -> Iterator[FakeStatsApi]:
    with FakeStatsApi(json_answer(sample("enabled"))) as api:
        yield api
    assert api.handler_errors == []


@pytest.fixture
def limited_api(limits_api: FakeStatsApi) -> FakeStatsApi:
    limits_api.answer(json_answer(sample("enabled")))
    return limits_api


@pytest.fixture(scope="module")
def limits_exporter(
    limits_api: FakeStatsApi, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExporterProcess]:
    folder = tmp_path_factory.mktemp("limits")
    config = write_config(
        folder,
        {
            "api": {"timeout": "10s"},
            "limits": {
                "max_queues": MAX_QUEUES,
                "max_queue_name_length": MAX_NAME,
                "max_extra_states": MAX_EXTRA_STATES,
            },
            "targets": [
                {"name": "roomy", "url": limits_api.url},
                {"name": "small", "url": limits_api.url, "max_body_size": "1KiB"},
            ],
        },
    )
    with running_exporter(config_args(config), folder) as exporter:
        yield exporter
    assert_no_traceback(exporter)


def with_queues(names: list[str]) -> dict[str, Any]:
    """The enabled sample whose queues are `names`, each a copy of its inventory queue."""
    document = sample("enabled")
    template = document["stats"]["inventory"]
    document["stats"] = {name: copy.deepcopy(template) for name in names}
    document["stats"]["redisStatus"] = "enabled"
    return document


@pytest.mark.parametrize("behaviour", ["normal", "undeclared"])
def test_body_over_the_targets_cap_is_up_0_with_reason_too_large(
    limits_exporter: ExporterProcess, limited_api: FakeStatsApi, behaviour: Behaviour
) -> None:
    document = sample("enabled")
    document["padding"] = "x" * 2048
    limited_api.answer(json_answer(document, behaviour))
    before = probe(limits_exporter, "small").errors()

    capped = probe(limits_exporter, "small")
    roomy = probe(limits_exporter, "roomy")

    assert capped.value("jobstats_up") == 0
    increments = {r: n - before[r] for r, n in capped.errors().items()}
    assert increments == {reason: int(reason == "too_large") for reason in REASONS}
    assert capped.queues() == set()
    assert roomy.value("jobstats_up") == 1


def test_ten_thousand_queues_export_the_cap_and_count_the_rest(
    limits_exporter: ExporterProcess, limited_api: FakeStatsApi
) -> None:
    names = [f"queue-{index:05d}" for index in range(10_000)]
    limited_api.answer(json_answer(with_queues(names)))

    exposition = probe(limits_exporter, "roomy")

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_queues") == MAX_QUEUES
    assert exposition.value("jobstats_dropped_queues", limit="max_queues") == 10_000 - MAX_QUEUES
    assert exposition.value("jobstats_dropped_queues", limit="max_queue_name_length") == 0
    exported = exposition.queues()
    assert len(exported) == MAX_QUEUES
    assert exported <= set(names)


def test_ten_thousand_character_queue_name_is_dropped_whole_and_counted(
    limits_exporter: ExporterProcess, limited_api: FakeStatsApi
) -> None:
    too_long = "L" * 10_000
    at_the_cap = "édge-" + "n" * (MAX_NAME - 5)
    assert len(at_the_cap) == MAX_NAME
    limited_api.answer(json_answer(with_queues(["inventory", too_long, "product", at_the_cap])))

    exposition = probe(limits_exporter, "roomy")

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_dropped_queues", limit="max_queue_name_length") == 1
    assert exposition.value("jobstats_dropped_queues", limit="max_queues") == 0
    # Exactly as given: no cut-down "LLL…" series, the name at the cap kept whole.
    assert exposition.queues() == {"inventory", "product", at_the_cap}
    assert exposition.value("jobstats_queues") == 3


def test_extra_states_over_the_cap_are_dropped_and_counted(
    limits_exporter: ExporterProcess, limited_api: FakeStatsApi
) -> None:
    document = with_queues(["inventory"])
    extra = {"prioritized": 1, "waiting-children": 2, "paused": 3, "stalled": 4, "other": 5}
    document["stats"]["inventory"].update(extra)
    limited_api.answer(json_answer(document))

    exposition = probe(limits_exporter, "roomy")

    assert exposition.value("jobstats_up") == 1
    assert exposition.value("jobstats_dropped_states") == len(extra) - MAX_EXTRA_STATES
    states = exposition.states_of("inventory")
    assert len(states) == 5 + MAX_EXTRA_STATES
    assert {state: states[state] for state in set(states) & set(extra)} == {
        state: extra[state] for state in set(states) & set(extra)
    }


# --- client certificates ----------------------------------------------------------------


def test_client_certificates_are_required_when_the_web_config_says_so(
    web_api: FakeStatsApi, ca: trustme.CA, tmp_path: Path
) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.crt"))
    web_config = write_web_config(
        tmp_path,
        ca,
        {
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": str(tmp_path / "clients-ca.crt"),
        },
    )
    config = write_config(tmp_path, {"targets": [{"name": "shop", "url": web_api.url}]})
    with_certificate = ssl.create_default_context()
    ca.configure_trust(with_certificate)
    ca.issue_cert("prometheus@example.com").configure_cert(with_certificate)
    without_certificate = ssl.create_default_context()
    ca.configure_trust(without_certificate)
    args = [*config_args(config), "--web.config.file", str(web_config)]
    with running_exporter(args, tmp_path, tls=with_certificate) as exporter:
        status, body = http_get(exporter.port, "/metrics", tls=with_certificate)
        assert status == 200
        assert Exposition.parse(body).value("jobstats_up") == 1
        with pytest.raises((OSError, http.client.HTTPException)):
            http_get(exporter.port, "/metrics", tls=without_certificate)
        # The refused handshake cost nothing to the others.
        assert http_get(exporter.port, "/-/healthy", tls=with_certificate)[0] == 200
    assert_no_traceback(exporter)


# --- a flood of half-sent requests ------------------------------------------------------


def test_scrapes_go_on_while_hundreds_of_connections_send_half_a_request(
    web_api: FakeStatsApi, tmp_path: Path
) -> None:
    config = write_config(tmp_path, {"targets": [{"name": "shop", "url": web_api.url}]})
    with running_exporter(config_args(config), tmp_path) as exporter:
        flood: list[socket.socket] = []
        try:
            for _ in range(500):
                connection = socket.create_connection((HOST, exporter.port), timeout=PATIENCE)
                connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                flood.append(connection)
            for _ in range(5):
                status, body = http_get(exporter.port, "/metrics")
                assert status == 200
                assert Exposition.parse(body).value("jobstats_up") == 1
            threads = Path(f"/proc/{exporter.pid}/status").read_text()
            assert "\nThreads:\t1\n" in threads  # no thread per connection
        finally:
            for connection in flood:
                connection.close()
    assert_no_traceback(exporter)


def test_prometheus_keeps_scraping_while_a_thousand_connections_send_half_a_request(
    web_api: FakeStatsApi, tmp_path: Path
) -> None:
    """What a reviewer does by hand: Prometheus scrapes every second on its kept-alive
    connection while a flood holds a thousand more, sent half a request each."""
    require_tool("prometheus")
    config = write_config(tmp_path, {"targets": [{"name": "shop", "url": web_api.url}]})
    prometheus_port = free_port()
    with running_exporter(config_args(config), tmp_path) as exporter:
        prometheus_yml = tmp_path / "prometheus.yml"
        prometheus_yml.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "jobstats",
                            "static_configs": [{"targets": [f"{HOST}:{exporter.port}"]}],
                        }
                    ],
                }
            )
        )
        with running_prometheus(prometheus_yml, tmp_path / "prometheus", prometheus_port):

            def scraped() -> list[dict[str, Any]]:
                return prometheus_query(prometheus_port, 'jobstats_up{job="jobstats"} == 1')

            poll(scraped, bool, PATIENCE, "Prometheus to scrape the exporter")
            flood: list[socket.socket] = []
            try:
                for _ in range(1000):
                    connection = socket.create_connection((HOST, exporter.port), PATIENCE)
                    connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    flood.append(connection)
                # Five scrape intervals with the flood held (the request deadline is 10 s).
                flooded_at = time.time()
                time.sleep(5.5)
                window = f"[{time.time() - flooded_at:.0f}s]"
                # The exporter holds the flood's sockets (accepted, waiting for the rest).
                held = len(list(Path(f"/proc/{exporter.pid}/fd").iterdir()))
                samples = prometheus_query(
                    prometheus_port, f'count_over_time(up{{job="jobstats"}}{window})'
                )
                worst = prometheus_query(
                    prometheus_port, f'min_over_time(up{{job="jobstats"}}{window})'
                )
                slowest = prometheus_query(
                    prometheus_port,
                    f'max_over_time(scrape_duration_seconds{{job="jobstats"}}{window})',
                )
                answered = prometheus_query(
                    prometheus_port, f'min_over_time(jobstats_up{{job="jobstats"}}{window})'
                )
            finally:
                for connection in flood:
                    connection.close()
    assert held >= 1000
    assert float(samples[0]["value"][1]) >= 4
    assert float(worst[0]["value"][1]) == 1
    assert float(answered[0]["value"][1]) == 1
    # Prometheus' scrape timeout is 1 s here; the scrapes stay far from it.
    assert float(slowest[0]["value"][1]) < 0.5
    assert_no_traceback(exporter)
