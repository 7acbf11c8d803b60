"""The alerting stack of the end-to-end tests: Prometheus, Alertmanager and a webhook sink.

Writes test copies of the shipped Prometheus, rule and Alertmanager files in which only
durations, addresses and secret file paths differ, and runs the real Debian binaries, each
in its own directory, stopped by the PID it was started with. Nothing here may listen or
connect beyond 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlencode, urlsplit

import pytest
import yaml

from upstream import HOST, POLL_INTERVAL, LoopbackServer, free_port, http_get, stop_process

__all__ = [
    "GROUP_INTERVAL",
    "GROUP_WAIT",
    "REPEAT_INTERVAL",
    "RULE_FOR",
    "SHIPPED_ALERTMANAGER",
    "SHIPPED_PROMETHEUS",
    "SLACK_PATH",
    "TEST_INTERVAL",
    "WINDOW_DIVISOR",
    "Notification",
    "ServiceProcess",
    "WebhookSink",
    "alertmanager_alerts",
    "duration_seconds",
    "poll",
    "post_alerts",
    "prometheus_alerts",
    "prometheus_label_values",
    "prometheus_query",
    "require_tool",
    "running_alertmanager",
    "running_prometheus",
    "shorten_expr",
    "write_alertmanager_config",
    "write_prometheus_config",
]

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PROMETHEUS = REPO / "prometheus" / "prometheus.yml"
SHIPPED_ALERTMANAGER = REPO / "alerts" / "alertmanager.yml"

#: Scrape and evaluation interval of the copy; it replaces the shipped one in subquery steps
#: and offsets too, because the rules sum positive steps between consecutive scrapes.
TEST_INTERVAL = "1s"
#: Every `for:` of the copy: two test scrape intervals, as the shipped ones are several.
RULE_FOR = "2s"
#: Every range window of the copy is the shipped one divided by this (10m becomes 2m): long
#: enough that one burst of failures outlives every phase of a test.
WINDOW_DIVISOR = 5
GROUP_WAIT = "1s"
GROUP_INTERVAL = "1s"
REPEAT_INTERVAL = "30s"
#: Where the copy's Slack receiver posts: the sink, beside the webhook's own path.
SLACK_PATH = "/slack"

_T = TypeVar("_T")


def require_tool(name: str) -> str:
    """The path of the binary `name`; skip when missing, fail when JOBSTATS_REQUIRE_TOOLS is set."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("JOBSTATS_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is required (JOBSTATS_REQUIRE_TOOLS is set) but not installed")
        pytest.skip(f"{name} is not installed")
    return path


def poll(fetch: Callable[[], _T], done: Callable[[_T], bool], timeout: float, what: str) -> _T:
    """Fetch until `done(value)`; that value. Fails naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}; last:\n{value!r}")
        time.sleep(POLL_INTERVAL)


# --- Durations -------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
# Square brackets only ever hold a range or a subquery in PromQL; label matchers use braces.
_RANGE = re.compile(r"\[(?P<window>[0-9a-z]+)(?::(?P<step>[0-9a-z]*))?\]")
_OFFSET = re.compile(r"\boffset\s+(?P<offset>[0-9a-z]+)")


def duration_seconds(text: str) -> float:
    """A Prometheus duration (`90s`, `1h30m`) in seconds."""
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(count) * _UNIT_SECONDS[unit] for count, unit in _DURATION_PART.findall(text))


def _duration(seconds: float) -> str:
    milliseconds = round(seconds * 1000)
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


def shorten_expr(expr: str, shipped_interval: float) -> str:
    """`expr` with windows divided by WINDOW_DIVISOR and steps and offsets set to TEST_INTERVAL.

    A step or offset other than the shipped scrape interval is an error: the copy could not
    keep its meaning, so the helper must be taught about it rather than guess.
    """

    def interval(text: str, where: str) -> str:
        if duration_seconds(text) != shipped_interval:
            raise ValueError(
                f"{where} {text} is not the shipped scrape interval in: {expr.strip()}"
            )
        return TEST_INTERVAL

    def window(match: re.Match[str]) -> str:
        shortened = _duration(duration_seconds(match["window"]) / WINDOW_DIVISOR)
        step = match["step"]
        if step is None:
            return f"[{shortened}]"
        return f"[{shortened}:{interval(step, 'subquery step') if step else ''}]"

    def offset(match: re.Match[str]) -> str:
        return f"offset {interval(match['offset'], 'offset')}"

    return _OFFSET.sub(offset, _RANGE.sub(window, expr))


# --- Test copies of the shipped files ----------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top")
    return document


def _dump(document: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def _expand(pattern: str, base: Path) -> list[Path]:
    """The files a config's relative glob names, resolved as the binaries do: from its folder."""
    found = sorted(base.glob(pattern))
    if not found:
        raise ValueError(f"{pattern!r} relative to {base} matches no file")
    return [path.resolve() for path in found]


def _rewrite_rules(source: Path, target: Path, shipped_interval: float) -> Path:
    document = _load(source)
    for group in document["groups"]:
        if "interval" in group:
            group["interval"] = TEST_INTERVAL
        for rule in group["rules"]:
            rule["expr"] = shorten_expr(rule["expr"], shipped_interval)
            if "for" in rule:
                rule["for"] = RULE_FOR
    return _dump(document, target)


def write_prometheus_config(
    directory: Path,
    *,
    exporter_port: int,
    alertmanager_port: int,
    prometheus_port: int,
    shipped: Path = SHIPPED_PROMETHEUS,
) -> Path:
    """A copy of the shipped prometheus.yml and of every rule file it loads, in `directory`.

    Intervals become TEST_INTERVAL, targets the test processes on 127.0.0.1; the rule files
    are rewritten by `shorten_expr` and RULE_FOR. The copy's path.
    """
    document = _load(shipped)
    settings = document.setdefault("global", {})
    shipped_interval = duration_seconds(settings.get("scrape_interval", "1m"))
    settings.update(
        scrape_interval=TEST_INTERVAL,
        scrape_timeout=TEST_INTERVAL,
        evaluation_interval=TEST_INTERVAL,
    )

    rule_files = []
    for pattern in document.get("rule_files", []):
        for source in _expand(pattern, shipped.parent):
            target = _rewrite_rules(source, directory / "rules" / source.name, shipped_interval)
            rule_files.append(str(target))
    document["rule_files"] = rule_files

    for alertmanager in document["alerting"]["alertmanagers"]:
        for static in alertmanager["static_configs"]:
            static["targets"] = [f"{HOST}:{alertmanager_port}"]

    ports = {"jobstats": exporter_port, "prometheus": prometheus_port}
    for scrape in document["scrape_configs"]:
        if scrape["job_name"] not in ports:
            raise ValueError(f"{shipped}: no test target for job {scrape['job_name']!r}")
        for key in ("scrape_interval", "scrape_timeout"):
            if key in scrape:
                scrape[key] = TEST_INTERVAL
        for static in scrape["static_configs"]:
            static["targets"] = [f"{HOST}:{ports[scrape['job_name']]}"]
    return _dump(document, directory / "prometheus.yml")


_GROUP_TIMERS = {
    "group_wait": GROUP_WAIT,
    "group_interval": GROUP_INTERVAL,
    "repeat_interval": REPEAT_INTERVAL,
}


def _shorten_route(route: dict[str, Any]) -> None:
    """The group timers that `route` and its children set, shortened."""
    for key, value in _GROUP_TIMERS.items():
        if key in route:
            route[key] = value
    for child in route.get("routes", []):
        _shorten_route(child)


def write_alertmanager_config(
    directory: Path, *, sink_url: str, shipped: Path = SHIPPED_ALERTMANAGER
) -> Path:
    """A copy of the shipped alertmanager.yml in `directory`; its path.

    Webhooks post to `sink_url` (keeping their path), Slack to `sink_url` + SLACK_PATH; the
    secret files are placeholders written in `directory`; e-mail goes to a closed port on
    127.0.0.1, so it fails without leaving the machine. Group timers become seconds.
    Routes, grouping, inhibition and receivers are otherwise the shipped ones.
    """
    secrets = directory / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    slack_url_file = secrets / "slack_api_url"
    slack_url_file.write_text(sink_url + SLACK_PATH + "\n", encoding="utf-8")
    password_file = secrets / "smtp_password"
    password_file.write_text("placeholder\n", encoding="utf-8")
    smarthost = f"{HOST}:{free_port()}"

    document = _load(shipped)
    settings = document.setdefault("global", {})
    if "slack_api_url_file" in settings:
        settings["slack_api_url_file"] = str(slack_url_file)
    if "smtp_auth_password_file" in settings:
        settings["smtp_auth_password_file"] = str(password_file)
    if "smtp_smarthost" in settings:
        settings["smtp_smarthost"] = smarthost

    templates = document.get("templates", [])
    for pattern in templates:
        _expand(pattern, shipped.parent)  # a glob that names no file is an error
    document["templates"] = [str(shipped.parent.resolve() / pattern) for pattern in templates]
    root = document["route"]
    root.update(_GROUP_TIMERS)  # the root's would otherwise be Alertmanager's defaults
    _shorten_route(root)

    for receiver in document["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = sink_url + urlsplit(webhook["url"]).path
        for slack in receiver.get("slack_configs", []):
            if "api_url" in slack:
                slack["api_url"] = sink_url + SLACK_PATH
            if "api_url_file" in slack:
                slack["api_url_file"] = str(slack_url_file)
        for email in receiver.get("email_configs", []):
            if "smarthost" in email:
                email["smarthost"] = smarthost
            if "auth_password_file" in email:
                email["auth_password_file"] = str(password_file)
    return _dump(document, directory / "alertmanager.yml")


# --- The webhook sink --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """One POST the sink received: its path and its JSON body."""

    path: str
    payload: dict[str, Any]

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.payload.get("alerts", []))

    def alert(self, alertname: str, status: str = "firing", **labels: str) -> dict[str, Any] | None:
        """The first alert named `alertname` with `status` and these labels, or None."""
        wanted = {"alertname": alertname, **labels}
        for alert in self.alerts:
            matches = all(alert["labels"].get(k) == v for k, v in wanted.items())
            if matches and alert.get("status") == status:
                return alert
        return None


class WebhookSink:
    """Alertmanager's webhook receiver, played by a ThreadingHTTPServer on 127.0.0.1.

    Records every POSTed JSON body with its path. Use as a context manager, or call `close()`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._errors: list[str] = []
        self._server = _SinkServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="webhook-sink"
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def errors(self) -> list[str]:
        """Bodies that were not JSON, and unexpected handler exceptions."""
        with self._lock:
            return list(self._errors)

    def notifications(self) -> list[Notification]:
        """The webhook notifications received so far (Slack's posts are not among them)."""
        with self._lock:
            return [n for n in self._received if n.path != SLACK_PATH]

    def slack_messages(self) -> list[Notification]:
        with self._lock:
            return [n for n in self._received if n.path == SLACK_PATH]

    def find_alert(
        self, alertname: str, status: str = "firing", **labels: str
    ) -> tuple[Notification, dict[str, Any]] | None:
        """The first notification carrying such an alert, and the alert; or None."""
        for notification in self.notifications():
            alert = notification.alert(alertname, status, **labels)
            if alert is not None:
                return notification, alert
        return None

    def wait_for_alert(
        self, alertname: str, timeout: float, status: str = "firing", **labels: str
    ) -> tuple[Notification, dict[str, Any]]:
        """`find_alert`, polled until it finds one or `timeout` seconds pass."""
        found = poll(
            lambda: self.find_alert(alertname, status, **labels),
            lambda found: found is not None,
            timeout,
            f"a {status} {alertname}{labels} at the webhook sink "
            f"(received: {[n.payload for n in self.notifications()]})",
        )
        assert found is not None
        return found

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    def __enter__(self) -> WebhookSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, path: str, body: bytes) -> bool:
        try:
            payload = json.loads(body)
        except ValueError as error:
            with self._lock:
                self._errors.append(f"{path}: {error}: {body[:200]!r}")
            return False
        with self._lock:
            self._received.append(Notification(path, payload))
        return True

    def _failed(self, error: BaseException | None) -> None:
        with self._lock:
            self._errors.append(repr(error))


class _SinkServer(LoopbackServer):
    def __init__(self, sink: WebhookSink) -> None:
        self.sink = sink
        super().__init__(_SinkHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError | TimeoutError):
            self.sink._failed(error)


class _SinkHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request a connection, so no idle keep-alive holds a thread at close.
    protocol_version = "HTTP/1.0"
    timeout = 10

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        accepted = cast(_SinkServer, self.server).sink._record(self.path, body)
        reply = b"ok" if accepted else b"not JSON"
        self.send_response(200 if accepted else 400)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


# --- Prometheus and Alertmanager as processes -------------------------------------------


class ServiceProcess:
    """Prometheus or Alertmanager started by this module; its output goes to one file."""

    def __init__(
        self, name: str, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def ready(self) -> bool:
        """True once /-/ready answers 200; fails at once if the process has exited."""
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode} before it was ready:\n"
                f"{self.log()}"
            )
        try:
            status, _ = http_get(self.port, "/-/ready", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, wait up to `timeout` s (then SIGKILL); the exit status."""
        return stop_process(self.process, timeout)


@contextmanager
def _running(
    name: str, argv: Sequence[str], port: int, directory: Path, ready_timeout: float
) -> Iterator[ServiceProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
        )
    service = ServiceProcess(name, process, port, log_path)
    try:
        poll(
            service.ready, bool, ready_timeout, f"{name} on {HOST}:{port} to be ready ({log_path})"
        )
        yield service
    finally:
        service.stop()


@contextmanager
def running_prometheus(
    config: Path, directory: Path, port: int, *, ready_timeout: float = 30.0
) -> Iterator[ServiceProcess]:
    """Prometheus on 127.0.0.1:`port` with its TSDB in `directory`, stopped by PID on exit."""
    argv = [
        require_tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    with _running("prometheus", argv, port, directory, ready_timeout) as service:
        yield service


@contextmanager
def running_alertmanager(
    config: Path, directory: Path, *, ready_timeout: float = 30.0
) -> Iterator[ServiceProcess]:
    """Alertmanager on 127.0.0.1, clustering off, data in `directory`, stopped by PID on exit."""
    port = free_port()
    argv = [
        require_tool("prometheus-alertmanager"),
        f"--config.file={config}",
        f"--storage.path={directory / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        # Empty: no gossip listener, so nothing binds beyond 127.0.0.1.
        "--cluster.listen-address=",
    ]
    with _running("alertmanager", argv, port, directory, ready_timeout) as service:
        yield service


# --- Their HTTP APIs ---------------------------------------------------------------------


def _http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=data, headers=headers)
        with connection.getresponse() as response:
            text = response.read()
            if response.status != 200:
                raise AssertionError(f"{method} {path}: {response.status} {text[:500]!r}")
            return json.loads(text) if text else None
    finally:
        connection.close()


def post_alerts(port: int, alerts: Sequence[Mapping[str, Any]]) -> None:
    """POST `alerts` to Alertmanager's /api/v2/alerts, as Prometheus does."""
    _http_json(port, "POST", "/api/v2/alerts", list(alerts))


def alertmanager_alerts(port: int) -> list[dict[str, Any]]:
    """Every alert Alertmanager holds and has not resolved, with its status and fingerprint."""
    return cast(list[dict[str, Any]], _http_json(port, "GET", "/api/v2/alerts"))


def prometheus_query(port: int, promql: str) -> list[dict[str, Any]]:
    """The instant vector `promql` evaluates to now, as Prometheus' HTTP API returns it."""
    answer = _http_json(port, "GET", "/api/v1/query?" + urlencode({"query": promql}))
    if answer["data"]["resultType"] != "vector":
        raise AssertionError(f"{promql} is not an instant vector: {answer}")
    return cast(list[dict[str, Any]], answer["data"]["result"])


def prometheus_label_values(
    port: int, label: str, selector: str, start: float, end: float
) -> list[str]:
    """The values of `label` among the series of `selector` between `start` and `end`."""
    params = urlencode({"match[]": selector, "start": start, "end": end})
    answer = _http_json(port, "GET", f"/api/v1/label/{label}/values?{params}")
    return cast(list[str], answer["data"])


def prometheus_alerts(port: int) -> list[dict[str, Any]]:
    """The pending and firing alerts of Prometheus' rules."""
    return cast(list[dict[str, Any]], _http_json(port, "GET", "/api/v1/alerts")["data"]["alerts"])
