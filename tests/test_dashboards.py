"""The Grafana dashboard: generated from code, shaped like the admin card, well-formed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import yaml

from exporter.card import render_card
from exporter.model import parse_stats
from exporter.schedule import CronSchedules

from alerting_stack import (
    poll,
    prometheus_label_values,
    prometheus_query,
    require_tool,
    running_prometheus,
    write_prometheus_config,
)
from bullmq_stack import (
    BullmqDriver,
    DriverError,
    RedisServer,
    redis_target_config,
    running_driver,
    running_redis,
)
from upstream import (
    HOST,
    Answer,
    ExporterProcess,
    FakeStatsApi,
    clean_environment,
    exporter_command,
    free_port,
    running_exporter,
)

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
OVERVIEW = GRAFANA / "dashboards" / "jobstats-overview.json"
SPEC = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
assert SPEC is not None
assert SPEC.loader is not None
BUILD = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(BUILD)
_T = TypeVar("_T")
STATE_COLORS = {
    "Waiting": "#8e8e8e",
    "Active": "blue",
    "Completed": "green",
    "Failed": "red",
    "Delayed": "yellow",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OVERVIEW.read_text(encoding="utf-8"))
    return document


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    (found,) = [p for p in panels(dashboard) if p.get("title") == title]
    return found


def override(panel: dict[str, Any], ref: str, prop: str) -> Any:
    for entry in panel["fieldConfig"]["overrides"]:
        if entry["matcher"] == {"id": "byFrameRefID", "options": ref}:
            for item in entry["properties"]:
                if item["id"] == prop:
                    return item["value"]
    raise AssertionError(f"no override {prop} for query {ref} in {panel['title']!r}")


def mapped(panel: dict[str, Any], ref: str) -> dict[str, tuple[str, str]]:
    """A query's value mappings as {value: (text, color)}."""
    (value_map,) = override(panel, ref, "mappings")
    return {key: (r["text"], r["color"]) for key, r in value_map["options"].items()}


def test_committed_json_is_what_the_generator_builds() -> None:
    assert BUILD.main(["--check"]) == 0, "run python grafana/build_dashboards.py"


def test_generator_check_fails_on_a_hand_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = json.loads(OVERVIEW.read_text(encoding="utf-8"))
    edited["title"] = "Edited by hand"
    (tmp_path / OVERVIEW.name).write_text(json.dumps(edited), encoding="utf-8")
    monkeypatch.setattr(BUILD, "DASHBOARD_DIR", tmp_path)
    assert BUILD.main(["--check"]) == 1
    assert BUILD.main([]) == 0
    assert BUILD.main(["--check"]) == 0


def test_header_reproduces_the_card_title_description_and_refresh(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["title"] == "Background Jobs"
    assert dashboard["uid"] == "jobstats-overview"
    assert dashboard["refresh"] == "30s"
    intro = next(p for p in dashboard["panels"] if p["type"] == "text")
    assert "Background Jobs" in intro["options"]["content"]
    assert "Real-time background job statistics and status" in intro["options"]["content"]
    assert panel(dashboard, "Last updated")["fieldConfig"]["defaults"]["unit"] == "dateTimeFromNow"


def test_no_refresh_link_that_reloads_nothing(dashboard: dict[str, Any]) -> None:
    # A link to the dashboard already open re-runs no query; Grafana's own button does.
    assert not [link for link in dashboard.get("links", []) if link["title"] == "Refresh"]
    intro = next(p for p in dashboard["panels"] if p["type"] == "text")
    assert "refresh button" in intro["options"]["content"]


def test_redis_panel_is_blue_with_enabled_and_available(dashboard: dict[str, Any]) -> None:
    redis = panel(dashboard, "Redis status")
    assert redis["fieldConfig"]["defaults"]["color"] == {"fixedColor": "blue", "mode": "fixed"}
    assert mapped(redis, "A") == {"1": ("Enabled", "blue"), "0": ("Disabled", "blue")}
    assert mapped(redis, "B") == {
        "1": ("Available", "blue"),
        "2": ("Availability not reported", "#8e8e8e"),
        "3": ("Unavailable", "red"),
    }
    assert redis["fieldConfig"]["defaults"]["noValue"] == "Unknown"


def test_queue_block_repeats_per_queue_two_per_row(dashboard: dict[str, Any]) -> None:
    block = panel(dashboard, "$queue")
    assert block["repeat"] == "queue"
    assert block["repeatDirection"] == "h"
    assert block["maxPerRow"] == 2
    assert block["gridPos"]["w"] == 12


def test_queue_badge_colors_follow_the_card(dashboard: dict[str, Any]) -> None:
    assert mapped(panel(dashboard, "$queue"), "STATUS") == {
        "1": ("Active", "green"),
        "2": ("Paused", "yellow"),
        "3": ("Stopped", "red"),
        "4": ("Unknown", "#8e8e8e"),
    }


def test_five_counts_have_the_card_colors(dashboard: dict[str, Any]) -> None:
    block = panel(dashboard, "$queue")
    by_ref = {t["refId"]: t for t in block["targets"]}
    for name, color in STATE_COLORS.items():
        ref = name.upper()
        assert by_ref[ref]["legendFormat"] == name
        assert f'state="{name.lower()}"' in by_ref[ref]["expr"]
        assert override(block, ref, "color") == {"mode": "fixed", "fixedColor": color}
    assert block["options"]["colorMode"] == "background"


def test_recurring_section_is_yellow_with_cron_words_and_countdown(
    dashboard: dict[str, Any],
) -> None:
    block = panel(dashboard, "$queue")
    by_ref = {t["refId"]: t for t in block["targets"]}
    assert by_ref["SCHEDULE"]["legendFormat"] == "{{cron}} · {{schedule}}"
    for ref in ("RECURRING", "SCHEDULE", "NEXT_RUN"):
        assert override(block, ref, "color") == {"mode": "fixed", "fixedColor": "yellow"}
    assert override(block, "NEXT_RUN", "unit") == "dateTimeFromNow"
    assert "time() - max(jobstats_queue_next_run_timestamp_seconds" in by_ref["OVERDUE"]["expr"]


def test_summary_has_system_status_and_total_completed(dashboard: dict[str, Any]) -> None:
    summary = panel(dashboard, "Summary")
    legends = {t["legendFormat"] for t in summary["targets"]}
    assert {"System status", "Exporter", "Stats API", "Total completed"} <= legends
    assert mapped(summary, "SYSTEM") == {"1": ("Healthy", "green"), "0": ("Needs attention", "red")}


def test_firing_alerts_table_shows_labels_not_series_plumbing(dashboard: dict[str, Any]) -> None:
    alerts = panel(dashboard, "Firing JobStats alerts")
    (target,) = alerts["targets"]
    assert 'instance=~"$instance|"' in target["expr"]
    (organize,) = alerts["transformations"]
    assert organize["id"] == "organize"
    hidden = {name for name, hide in organize["options"]["excludeByName"].items() if hide}
    assert hidden == {"Time", "Value", "__name__", "alertstate", "job"}
    assert organize["options"]["indexByName"]["alertname"] == 0


def test_exporter_queries_follow_the_job_variable(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    reading_up = [e for e in exprs if re.search(r"\b(up|scrape_duration_seconds)\{", e)]
    assert len(reading_up) >= 4
    for expr in reading_up:
        assert 'job="$job"' in expr
    assert not [e for e in exprs if 'job="jobstats"' in e]
    (job,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert job["current"]["value"] == "jobstats"


def test_history_panels_exist(dashboard: dict[str, Any]) -> None:
    titles = {p.get("title") for p in panels(dashboard)}
    assert {
        "Jobs by state: $queue",
        "New failed jobs per minute",
        "Failure ratio (30 min)",
        "Throughput: completed jobs per minute",
        "Waiting backlog",
        "Availability",
        "Scrape duration",
        "Failed scrapes per minute, by reason",
        "Firing JobStats alerts",
    } <= titles


#: The panels of the Redis source section, fed by a target's BullMQ Redis only.
REDIS_SOURCE = "Redis source"
FAILED_PER_MINUTE = "Failed jobs per minute (event counters)"
COMPLETED_PER_MINUTE = "Completed jobs per minute (event counters)"
WAIT_TIME = "Wait time p50 / p95 (event streams)"
RUN_TIME = "Run time p50 / p95 (event streams)"
OLDEST_WAITING = "Oldest waiting job"
WORKERS = "Workers"
REDIS_SOURCE_GRAPHS = (
    FAILED_PER_MINUTE,
    COMPLETED_PER_MINUTE,
    WAIT_TIME,
    RUN_TIME,
    OLDEST_WAITING,
    WORKERS,
)


def test_redis_source_panels_read_one_exporter_and_say_why_when_empty(
    dashboard: dict[str, Any],
) -> None:
    status = panel(dashboard, REDIS_SOURCE)
    assert mapped(status, "STATUS") == {
        "1": ("Up", "green"),
        "0": ("Down", "red"),
        "2": ("Not configured", "#8e8e8e"),
    }
    for title in REDIS_SOURCE_GRAPHS:
        found = panel(dashboard, title)
        assert "no Redis source configured" in found["fieldConfig"]["defaults"]["noValue"], title
        for target in found["targets"]:
            # An HA pair never adds up, and a Redis that cannot be read is no 0.
            assert "queue:jobstats_event_counters:selected" in target["expr"], title
            assert "jobstats_redis_up == 1" in target["expr"], title
    for title in (WAIT_TIME, RUN_TIME):
        exprs = {t["refId"]: t["expr"] for t in panel(dashboard, title)["targets"]}
        assert set(exprs) == {"P50", "P95"}
        assert exprs["P50"].startswith("histogram_quantile(0.5, ")
        assert exprs["P95"].startswith("histogram_quantile(0.95, ")
        assert all("_bucket{" in e and "rate(" in e for e in exprs.values())


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in panels(dashboard):
        grid = p["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_datasource_reference_resolves_to_the_provisioned_uid(
    dashboard: dict[str, Any],
) -> None:
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = provisioned["datasources"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    assert variables["datasource"]["query"] == source["type"]

    def resolve(ref: dict[str, str]) -> str:
        uid = ref["uid"]
        return variables["datasource"]["current"]["value"] if uid == "${datasource}" else uid

    references = [p["datasource"] for p in panels(dashboard) if "datasource" in p]
    references += [t["datasource"] for p in panels(dashboard) for t in p.get("targets", [])]
    references += [v["datasource"] for v in variables.values() if "datasource" in v]
    assert references
    for ref in references:
        assert ref["type"] == "prometheus"
        assert resolve(ref) == source["uid"]


def test_variables_are_datasource_job_instance_and_multi_value_queue(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "queue"]
    queue = variables["queue"]
    assert queue["multi"] is True
    assert queue["includeAll"] is True
    assert queue["current"]["value"] == ["$__all"]
    # The queues of the answer now, not of the last 6 hours.
    assert queue["query"].startswith("query_result(")


def test_no_query_uses_a_job_label_for_queues(dashboard: dict[str, Any]) -> None:
    for p in panels(dashboard):
        for target in p.get("targets", []):
            assert 'job=~"$queue"' not in target["expr"]
            assert "{{job}}" not in target.get("legendFormat", "")


def test_provisioning_points_at_the_dashboards() -> None:
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "jobstats.yml").read_text()
    )
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"] == "/var/lib/grafana/dashboards"


# --- Every query on live data, evaluated as Grafana evaluates it -------------------------

#: A query allowed to return nothing: it lists firing alerts, none when all is well.
MAY_BE_EMPTY = {"Firing JobStats alerts"}
#: The dashboard's time range, as Grafana writes $__range.
RANGE_SECONDS = 6 * 3600
#: What Grafana writes for $__rate_interval and $__interval at that range.
RATE_INTERVAL = "1m"
INTERVAL = "15s"
#: Longest wait for Prometheus to see what a scenario's API now answers.
SETTLE_SECONDS = 60.0


def regex_escape(value: str) -> str:
    """A label value as Grafana writes it into a Prometheus regex, in a PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def regex_of(values: Sequence[str]) -> str:
    """A multi-value variable as Grafana writes it into a regex matcher: `(a|b)`."""
    escaped = [regex_escape(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def js_regex(text: str) -> re.Pattern[str]:
    """A variable's `/pattern/` regex option as Python reads it."""
    match = re.fullmatch(r"/(.*)/", text)
    assert match, text
    return re.compile(match[1])


class Board:
    """The dashboard as Grafana shows it for some exporters, asked of a real Prometheus.

    Variables are set as Grafana sets them: `job` its default, `instance` the exporters
    given, `queue` All of what its own query returns; `label_values` reads the series of
    the dashboard's time range, `query_result` evaluates at now.
    """

    def __init__(self, dashboard: dict[str, Any], port: int, instances: Sequence[str]) -> None:
        self.dashboard = dashboard
        self.port = port
        self.values = {"job": "jobstats", "instance": regex_of(instances)}

    def substituted(self, expr: str, queue: str | None = None) -> str:
        values = {
            **self.values,
            "queue": queue if queue is not None else self.queue_regex(),
            "__range": f"{RANGE_SECONDS}s",
            "__rate_interval": RATE_INTERVAL,
            "__interval": INTERVAL,
        }
        # Longest names first: $__rate_interval before $__range, $instance before...
        for name in sorted(values, key=len, reverse=True):
            expr = expr.replace(f"${name}", values[name])
        return expr

    def variable(self, name: str) -> list[str]:
        """The values the variable's own query lists now, sorted as the dashboard sorts them."""
        (found,) = [v for v in self.dashboard["templating"]["list"] if v["name"] == name]
        query = self.substituted(found["query"], queue=".*")
        label_values = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        if label_values:
            now = time.time()
            return sorted(
                prometheus_label_values(
                    self.port, label_values[2], label_values[1], now - RANGE_SECONDS, now
                )
            )
        query_result = re.fullmatch(r"query_result\((.+)\)", query)
        assert query_result, query
        pattern = js_regex(found["regex"])
        now_ms = time.time() * 1000
        lines = [
            f"{r['metric'].get('__name__', '')}{{"
            + ",".join(f'{k}="{v}"' for k, v in r["metric"].items() if k != "__name__")
            + f"}} {r['value'][1]} {now_ms:.0f}"
            for r in prometheus_query(self.port, query_result[1])
        ]
        return sorted({m[1] for line in lines if (m := pattern.search(line))})

    def queue_regex(self) -> str:
        queues = self.variable("queue")
        # With no queue Grafana's All is an empty group, which matches no queue label.
        return regex_of(queues) if queues else "()"

    def exprs(self, title: str, queue: str | None = None) -> dict[str, str]:
        """Each query of the panel, by ref; a repeated panel's copy for `queue`."""
        found = panel(self.dashboard, title)
        value = regex_escape(queue) if queue is not None else None
        return {t["refId"]: self.substituted(t["expr"], value) for t in found.get("targets", [])}

    def series(self, title: str, ref: str = "A", queue: str | None = None) -> list[Series]:
        """What the query answers now: (labels, value) of each series."""
        expr = self.exprs(title, queue)[ref]
        return [
            (dict(r["metric"]), float(r["value"][1])) for r in prometheus_query(self.port, expr)
        ]

    def value(self, title: str, ref: str = "A", queue: str | None = None) -> float | None:
        """The one value a big-value query shows now; None for the panel's "No value"."""
        answer = self.series(title, ref, queue)
        assert len(answer) <= 1, answer
        return answer[0][1] if answer else None

    def shown(self, title: str, ref: str = "A", queue: str | None = None) -> str | None:
        """The value as the stat panel words it: its mapping's text, else the number."""
        value = self.value(title, ref, queue)
        if value is None:
            return None
        try:
            texts = {
                key: text for key, (text, _) in mapped(panel(self.dashboard, title), ref).items()
            }
        except AssertionError:
            texts = {}
        return texts.get(f"{value:g}", f"{value:g}")

    def firing(self) -> set[str]:
        return {labels["alertname"] for labels, _ in self.series("Firing JobStats alerts")}


Series = tuple[dict[str, str], float]


def live_queries(board: Board, queues: Sequence[str]) -> list[tuple[str, str, str]]:
    """(panel title, query ref, PromQL) of every panel; a repeated panel once per queue."""
    found = []
    for p in panels(board.dashboard):
        repeated: Sequence[str | None] = queues if p.get("repeat") == "queue" else (None,)
        for queue in repeated:
            title = p["title"].replace("$queue", queue or "")
            for ref, expr in board.exprs(p["title"], queue).items():
                found.append((title, ref, expr))
    return found


@pytest.mark.integration
def test_every_panel_query_returns_data_from_the_demo(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    require_tool("prometheus")
    prometheus_port = free_port()
    with running_exporter([], tmp_path, command=["demo"]) as exporter:
        config = write_prometheus_config(
            tmp_path,
            exporter_port=exporter.port,
            alertmanager_port=free_port(),
            prometheus_port=prometheus_port,
        )
        with running_prometheus(config, tmp_path / "prometheus", prometheus_port):
            board = Board(dashboard, prometheus_port, [f"{HOST}:{exporter.port}"])
            poll(
                lambda: board.variable("queue"),
                lambda queues: queues == sorted(DEMO_QUEUES),
                SETTLE_SECONDS,
                "the queue variable to list the demo's queues",
            )
            assert board.variable("job") == ["jobstats"]
            assert board.variable("instance") == [f"{HOST}:{exporter.port}"]
            queries = live_queries(board, DEMO_QUEUES)
            assert len(queries) > 30

            # The demo has no Redis source: those panels are checked apart, below.
            api_queries = [
                (title, ref, expr)
                for title, ref, expr in queries
                if title not in REDIS_SOURCE_GRAPHS and (title, ref) != (REDIS_SOURCE, "MISSED")
            ]
            poll_every_query_returns_data(prometheus_port, api_queries)
            assert board.shown("Summary", "SYSTEM") in ("Healthy", "Needs attention")
            # What the card never had says so, rather than showing a flat 0.
            assert board.shown(REDIS_SOURCE, "STATUS") == "Not configured"
            assert board.value(REDIS_SOURCE, "MISSED") is None
            for title in REDIS_SOURCE_GRAPHS:
                for ref in board.exprs(title):
                    assert board.series(title, ref) == [], title


def poll_every_query_returns_data(
    prometheus_port: int, queries: Sequence[tuple[str, str, str]]
) -> None:
    """Until every query but those of MAY_BE_EMPTY answers something; those must parse."""

    def empty() -> list[str]:
        return [
            f"{title} [{ref}]: {expr}"
            for title, ref, expr in queries
            if title not in MAY_BE_EMPTY and not prometheus_query(prometheus_port, expr)
        ]

    # Parse errors raise at once; empty answers get until the rules have history.
    poll(empty, lambda missing: not missing, 60.0, "every panel query to return data")
    for title, _, expr in queries:
        if title in MAY_BE_EMPTY:
            prometheus_query(prometheus_port, expr)


#: The demo's queues (exporter/demo.py).
DEMO_QUEUES = ("emails", "inventory", "product")


# --- Bad days -----------------------------------------------------------------------------
#
# Scenario by scenario, a fake stats API answers what a bad day answers, an exporter reads
# it and one Prometheus (with the shipped rules, shortened) scrapes every exporter. Each
# scenario looks at its own exporters through the `instance` variable, and compares the
# dashboard's System status with what `check` prints for the same answer.

SCENARIOS = (
    "api_down",
    "queue_leaves",
    "invalid_cron",
    "overdue_active",
    "overdue_paused",
    "malformed",
    "redis_unreported",
    "pair_a",
    "pair_b",
)


def queue_entry(
    *,
    status: str = "active",
    completed: int = 5,
    failed: int = 1,
    cron: str | None = "*/6 * * * *",
    next_run_in: float = 300.0,
) -> dict[str, Any]:
    """One queue of a stats answer; its next run `next_run_in` seconds from now."""
    entry: dict[str, Any] = {
        "waiting": 0,
        "active": 0,
        "completed": completed,
        "failed": failed,
        "delayed": 0,
        "status": status,
    }
    if cron is not None:
        entry["recurringJobs"] = {
            "count": 1,
            "nextRun": round((time.time() + next_run_in) * 1000),
            "cron": cron,
        }
    return entry


def stats_body(queues: dict[str, Any], redis_available: bool | None = True) -> bytes:
    document: dict[str, Any] = {"success": True, "stats": {**queues, "redisStatus": "enabled"}}
    if redis_available is not None:
        document["redisAvailable"] = redis_available
    return json.dumps(document).encode()


def card_says(body: bytes) -> str:
    """The system status `jobstats-exporter check` prints for this answer."""
    card = render_card(parse_stats(body), time.time(), CronSchedules(), "test")
    match = re.search(r"^System: (healthy|needs attention);", card, re.MULTILINE)
    assert match, card
    return match[1]


class Scenario:
    """One exporter of the stack, the fake API it reads, and what it answers now."""

    def __init__(self, api: FakeStatsApi, exporter: ExporterProcess) -> None:
        self.api = api
        self.exporter = exporter
        self.body = b""

    @property
    def instance(self) -> str:
        return f"{HOST}:{self.exporter.port}"

    def answer(self, body: bytes) -> None:
        self.body = body
        self.api.answer(Answer(body=body))


@dataclass
class Stack:
    prometheus_port: int
    scenarios: dict[str, Scenario]

    def board(self, dashboard: dict[str, Any], *names: str) -> Board:
        return Board(dashboard, self.prometheus_port, [self.scenarios[n].instance for n in names])


def scrape_all(config: Path, ports: Sequence[int], *, rules: bool = True) -> Path:
    """The test Prometheus config, scraping every exporter of `ports`; without the rules."""
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    (scrape,) = [s for s in document["scrape_configs"] if s["job_name"] == "jobstats"]
    scrape["static_configs"] = [{"targets": [f"{HOST}:{port}" for port in ports]}]
    if not rules:
        document["rule_files"] = []
    config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_tool("prometheus")
    directory = tmp_path_factory.mktemp("bad-days")
    healthy = stats_body({"inventory": queue_entry()})
    with ExitStack() as stack:
        scenarios = {}
        for name in SCENARIOS:
            api = stack.enter_context(FakeStatsApi(Answer(body=healthy)))
            exporter = stack.enter_context(
                running_exporter(["--api.url", api.url, "--api.timeout", "1s"], directory)
            )
            scenarios[name] = Scenario(api, exporter)
            scenarios[name].body = healthy
        prometheus_port = free_port()
        config = write_prometheus_config(
            directory,
            exporter_port=0,
            alertmanager_port=free_port(),
            prometheus_port=prometheus_port,
        )
        scrape_all(config, [s.exporter.port for s in scenarios.values()])
        stack.enter_context(running_prometheus(config, directory / "prometheus", prometheus_port))
        yield Stack(prometheus_port, scenarios)


def settle(fetch: Callable[[], _T], done: Callable[[_T], bool], what: str) -> _T:
    return poll(fetch, done, SETTLE_SECONDS, what)


def system_status(board: Board) -> str | None:
    shown = board.shown("Summary", "SYSTEM")
    return shown.lower() if shown is not None else None


@pytest.mark.integration
def test_api_down_freezes_last_updated_and_needs_attention(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["api_down"]
    board = stack.board(dashboard, "api_down")
    settle(lambda: system_status(board), lambda s: s == "healthy", "a healthy start")
    down_since = time.time()
    scenario.api.answer(Answer(status=503, body=b"Service Unavailable\n"))
    settle(lambda: board.value("Summary", "API"), lambda v: v == 0, "Stats API to fail")
    last_updated = board.value("Last updated")
    assert last_updated is not None
    assert last_updated / 1000 <= down_since

    def failed_scrapes() -> float:
        answers = prometheus_query(
            stack.prometheus_port,
            f'jobstats_scrape_errors_total{{instance="{scenario.instance}",reason="http_status"}}',
        )
        # The board may see the API fail a moment before Prometheus answers for the counter
        # (another scrape, another query): no series yet is no failed scrape yet.
        return float(answers[0]["value"][1]) if answers else 0.0

    seen = failed_scrapes()
    settle(failed_scrapes, lambda count: count >= seen + 3, "three more failed scrapes")
    assert board.value("Last updated") == last_updated
    assert system_status(board) == "needs attention"
    assert board.shown("Summary", "API") == "Failing"
    assert board.shown("Summary", "EXPORTER") == "Up"
    # Unknown (the panels' no value), not a reassuring 0.
    for ref in ("NOT_ACTIVE", "OVERDUE", "INVALID", "COMPLETED"):
        assert board.value("Summary", ref) is None, ref
    assert board.value("Redis status", "A") is None
    assert board.value("Redis status", "B") is None
    # The queues last seen stay listed, their history one click away.
    assert board.variable("queue") == ["inventory"]
    reasons = {labels["reason"]: value for labels, value in board.series(FAILED_SCRAPES)}
    assert reasons["http_status"] > 0
    assert reasons["connect"] == 0


FAILED_SCRAPES = "Failed scrapes per minute, by reason"


@pytest.mark.integration
def test_a_queue_that_leaves_the_answer_leaves_the_queue_variable(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["queue_leaves"]
    board = stack.board(dashboard, "queue_leaves")
    scenario.answer(stats_body({"inventory": queue_entry(), "product": queue_entry()}))
    settle(lambda: board.variable("queue"), lambda q: q == ["inventory", "product"], "two queues")
    scenario.answer(stats_body({"inventory": queue_entry()}))
    settle(lambda: board.variable("queue"), lambda q: q == ["inventory"], "product to leave")
    # What the variable read before: the series of the last 6 hours still name product.
    now = time.time()
    selector = f'jobstats_queue_jobs{{instance="{scenario.instance}"}}'
    assert "product" in prometheus_label_values(
        stack.prometheus_port, "queue", selector, now - RANGE_SECONDS, now
    )
    assert board.value("$queue", "WAITING", queue="product") is None


@pytest.mark.integration
def test_an_invalid_cron_shows_its_words_not_nothing(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["invalid_cron"]
    board = stack.board(dashboard, "invalid_cron")
    scenario.answer(
        stats_body({"inventory": queue_entry(), "product": queue_entry(cron="61 * * * *")})
    )
    settle(lambda: board.variable("queue"), lambda q: q == ["inventory", "product"], "two queues")
    (labels, value), *rest = settle(
        lambda: board.series("$queue", "SCHEDULE", queue="product"),
        lambda series: bool(series),
        "the schedule of product",
    )
    assert not rest
    assert labels == {"cron": "61 * * * *", "schedule": "invalid cron pattern"}
    assert value == 0
    assert board.shown("$queue", "SCHEDULE", queue="product") == "invalid cron pattern"
    assert "61 * * * * (invalid cron pattern)" in render_card(
        parse_stats(scenario.body), time.time(), CronSchedules(), "test"
    )
    assert board.series("$queue", "SCHEDULE", queue="inventory") == [
        ({"cron": "*/6 * * * *", "schedule": "Every 6 minutes"}, 360.0)
    ]
    assert system_status(board) == card_says(scenario.body) == "healthy"


@pytest.mark.integration
def test_an_overdue_schedule_on_an_active_queue_needs_attention(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["overdue_active"]
    board = stack.board(dashboard, "overdue_active")
    scenario.answer(stats_body({"inventory": queue_entry(next_run_in=-600)}))
    settle(
        lambda: board.value("$queue", "OVERDUE", queue="inventory"),
        lambda v: v is not None and v >= 600,
        "inventory to be 10 minutes overdue",
    )
    assert board.value("Summary", "OVERDUE") == 1
    assert board.value("Summary", "NOT_ACTIVE") == 0
    assert system_status(board) == card_says(scenario.body) == "needs attention"
    settle(board.firing, lambda names: "JobStatsRecurringJobOverdue" in names, "the overdue alert")


@pytest.mark.integration
def test_an_overdue_schedule_on_a_paused_queue_needs_attention(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["overdue_paused"]
    board = stack.board(dashboard, "overdue_paused")
    scenario.answer(stats_body({"inventory": queue_entry(status="paused", next_run_in=-600)}))
    settle(
        lambda: board.shown("$queue", "STATUS", queue="inventory"),
        lambda shown: shown == "Paused",
        "inventory to be paused",
    )
    value = board.value("$queue", "OVERDUE", queue="inventory")
    assert value is not None
    assert value >= 600
    assert board.value("Summary", "OVERDUE") == 1
    assert board.value("Summary", "NOT_ACTIVE") == 1
    assert system_status(board) == card_says(scenario.body) == "needs attention"
    settle(board.firing, lambda names: "JobStatsQueueNotActive" in names, "the not-active alert")


@pytest.mark.integration
def test_a_malformed_queue_needs_attention(dashboard: dict[str, Any], stack: Stack) -> None:
    scenario = stack.scenarios["malformed"]
    board = stack.board(dashboard, "malformed")
    broken = queue_entry() | {"failed": "abc"}
    scenario.answer(stats_body({"inventory": queue_entry(), "product": broken}))
    settle(
        lambda: board.value("Summary", "INVALID"), lambda v: v == 1, "one skipped malformed queue"
    )
    assert "skipped malformed queue" in render_card(
        parse_stats(scenario.body), time.time(), CronSchedules(), "test"
    )
    assert system_status(board) == card_says(scenario.body) == "needs attention"
    assert board.variable("queue") == ["inventory"]


@pytest.mark.integration
def test_redis_availability_not_reported_says_so_and_stays_healthy(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    scenario = stack.scenarios["redis_unreported"]
    board = stack.board(dashboard, "redis_unreported")
    scenario.answer(stats_body({"inventory": queue_entry()}, redis_available=None))
    settle(
        lambda: board.shown("Redis status", "B"),
        lambda shown: shown == "Availability not reported",
        "the connection to say it is not reported",
    )
    assert "availability not reported" in render_card(
        parse_stats(scenario.body), time.time(), CronSchedules(), "test"
    )
    assert board.shown("Redis status", "A") == "Enabled"
    assert system_status(board) == card_says(scenario.body) == "healthy"


@pytest.mark.integration
def test_two_exporters_show_the_worst_and_one_failure_ratio(
    dashboard: dict[str, Any], stack: Stack
) -> None:
    first, second = stack.scenarios["pair_a"], stack.scenarios["pair_b"]
    pair = stack.board(dashboard, "pair_a", "pair_b")
    quiet = stats_body({"emails": queue_entry(completed=0, failed=0)})
    for scenario in (first, second):
        scenario.answer(quiet)
    ratio_rules = (
        "queue:jobstats_failed_jobs:new30m"
        f'{{instance=~"{pair.values["instance"]}",queue="emails"}} == 0'
    )
    settle(
        lambda: prometheus_query(stack.prometheus_port, ratio_rules),
        lambda answer: len(answer) == 2,
        "both exporters to have counted no failure",
    )
    # An HA pair: the same API answer behind both, one job failed of three finished.
    busy = stats_body({"emails": queue_entry(completed=2, failed=1)})
    first.answer(busy)
    second.answer(stats_body({"emails": queue_entry(completed=2, failed=1)}, False))

    def ratio() -> list[Series]:
        return pair.series("Failure ratio (30 min)")

    settle(ratio, lambda series: [v for _, v in series] == [pytest.approx(1 / 3)], "a 1/3 ratio")
    # One exporter whose backend lost Redis is not hidden by the healthy one.
    assert pair.shown("Redis status", "B") == "Unavailable"
    assert pair.shown("Redis status", "A") == "Enabled"
    assert card_says(first.body) == "healthy"
    assert card_says(second.body) == "needs attention"
    assert system_status(pair) == "needs attention"
    assert system_status(stack.board(dashboard, "pair_a")) == "healthy"


@pytest.mark.integration
def test_without_the_recording_rules_the_rule_panels_say_no_data(
    dashboard: dict[str, Any], stack: Stack, tmp_path: Path
) -> None:
    scenario = stack.scenarios["redis_unreported"]
    prometheus_port = free_port()
    config = write_prometheus_config(
        tmp_path, exporter_port=0, alertmanager_port=free_port(), prometheus_port=prometheus_port
    )
    scrape_all(config, [scenario.exporter.port], rules=False)
    with running_prometheus(config, tmp_path / "prometheus", prometheus_port):
        board = Board(dashboard, prometheus_port, [scenario.instance])
        settle(lambda: board.variable("queue"), lambda queues: queues == ["inventory"], "the queue")
        settle(
            lambda: board.value("$queue", "FAILED", queue="inventory"),
            lambda value: value is not None,
            "the failed count",
        )
        for title in (
            "New failed jobs per minute",
            "Failure ratio (30 min)",
            "Throughput: completed jobs per minute",
        ):
            assert board.series(title) == [], title
            assert (
                "recording rules" in panel(dashboard, title)["fieldConfig"]["defaults"]["noValue"]
            )


# --- The Redis source, with the real thing ------------------------------------------------
#
# A real BullMQ (tests/bullmq, driven by bullmq_stack) on real redis-servers: an HA pair of
# exporters on one Redis, and one exporter alone on another Redis that a test kills. One
# Prometheus with the shipped rules scrapes the three; the stats API is a fake that names
# the same queues, so the queue variable lists them.

REDIS_QUEUES = ("inventory", "mail")


def query_at(port: int, promql: str, at: float) -> list[Series]:
    """The instant vector `promql` evaluates to at `at`: one moment for several queries."""
    params = urlencode({"query": promql, "time": f"{at:.3f}"})
    with urlopen(f"http://{HOST}:{port}/api/v1/query?{params}", timeout=10) as response:
        answer = json.load(response)
    return [(dict(r["metric"]), float(r["value"][1])) for r in answer["data"]["result"]]


def redis_config(directory: Path, api: FakeStatsApi, server: RedisServer) -> Path:
    """An exporter config whose one target reads `api` and the BullMQ Redis `server`."""
    return redis_target_config(directory, api.url, server.url)


@dataclass
class RedisStack:
    prometheus_port: int
    shared: RedisServer
    shared_driver: BullmqDriver
    lonely: RedisServer
    lonely_driver: BullmqDriver
    #: pair_a and pair_b read the shared Redis (pair_a started first), lonely the other.
    exporters: dict[str, ExporterProcess]

    def instance(self, name: str) -> str:
        return f"{HOST}:{self.exporters[name].port}"

    def board(self, dashboard: dict[str, Any], *names: str) -> Board:
        return Board(dashboard, self.prometheus_port, [self.instance(n) for n in names])


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisStack]:
    require_tool("prometheus")
    directory = tmp_path_factory.mktemp("redis-source")
    body = stats_body({name: queue_entry() for name in REDIS_QUEUES})
    with ExitStack() as stack:
        api = stack.enter_context(FakeStatsApi(Answer(body=body)))
        servers, drivers = {}, {}
        for name in ("shared", "lonely"):
            servers[name] = stack.enter_context(running_redis(directory / name / "redis"))
            drivers[name] = stack.enter_context(
                running_driver(servers[name].url, directory / name / "driver")
            )
            for queue in REDIS_QUEUES:
                drivers[name].open_queue(queue)
                # A queue exists in Redis from its first job; this one waits for a worker.
                drivers[name].add(queue, "first", {"ms": 1})
        exporters = {}
        for name, server in (
            ("pair_a", servers["shared"]),
            ("pair_b", servers["shared"]),
            ("lonely", servers["lonely"]),
        ):
            config = redis_config(directory / name, api, server)
            exporters[name] = stack.enter_context(
                running_exporter(["--config.file", str(config)], directory / name)
            )
        prometheus_port = free_port()
        config = write_prometheus_config(
            directory,
            exporter_port=0,
            alertmanager_port=free_port(),
            prometheus_port=prometheus_port,
        )
        scrape_all(config, [e.port for e in exporters.values()])
        stack.enter_context(running_prometheus(config, directory / "prometheus", prometheus_port))
        # Every exporter follows every queue's stream before a test makes BullMQ run jobs.
        followed = f'count(jobstats_queue_jobs_failed_total{{queue=~"{regex_of(REDIS_QUEUES)}"}})'
        settle(
            lambda: prometheus_query(prometheus_port, followed),
            lambda answer: bool(answer) and answer[0]["value"][1] == str(2 * len(exporters)),
            "every exporter to follow every queue",
        )
        yield RedisStack(
            prometheus_port,
            servers["shared"],
            drivers["shared"],
            servers["lonely"],
            drivers["lonely"],
            exporters,
        )


def by_queue(board: Board, title: str, ref: str = "A") -> dict[str, float]:
    """A graph's values now, by queue (one series per queue)."""
    found: dict[str, float] = {}
    for labels, value in board.series(title, ref):
        assert labels["queue"] not in found, f"{title}: two series for {labels['queue']}"
        found[labels["queue"]] = value
    return found


def by_outcome(board: Board, title: str, ref: str, queue: str) -> dict[str, float]:
    return {
        labels["outcome"]: value
        for labels, value in board.series(title, ref)
        if labels["queue"] == queue
    }


@pytest.mark.integration
def test_redis_source_panels_show_the_jobs_bullmq_ran(
    dashboard: dict[str, Any], redis_stack: RedisStack
) -> None:
    board = redis_stack.board(dashboard, "pair_a", "pair_b")
    driver = redis_stack.shared_driver
    settle(lambda: board.variable("queue"), lambda q: q == list(REDIS_QUEUES), "the queues")
    settle(lambda: board.shown(REDIS_SOURCE, "STATUS"), lambda s: s == "Up", "Redis source up")
    # No worker yet: the first job waits, and waits longer.
    (first,) = settle(
        lambda: [by_queue(board, OLDEST_WAITING).get("inventory", 0.0)],
        lambda ages: ages[0] > 0,
        "the oldest waiting job of inventory",
    )
    settle(
        lambda: by_queue(board, OLDEST_WAITING).get("inventory", 0.0),
        lambda age: age >= first + 1,
        "the oldest waiting age to rise",
    )
    assert by_queue(board, WORKERS)["inventory"] == 0
    worker = driver.start_worker("inventory", "clerk")
    try:
        jobs = [{"name": "ok", "data": {"ms": 150}} for _ in range(4)]
        jobs += [{"name": "bad", "data": {"ms": 5, "fail": True}} for _ in range(3)]
        driver.add_bulk("inventory", jobs)
        driver.wait_finished("inventory", 8)
        assert driver.state("inventory").finished["failed"] == 3
        settle(lambda: by_queue(board, WORKERS), lambda w: w.get("inventory") == 1, "one worker")
        settle(
            lambda: by_queue(board, FAILED_PER_MINUTE),
            lambda v: v.get("inventory", 0) > 0,
            "failed jobs per minute",
        )
        settle(
            lambda: by_queue(board, COMPLETED_PER_MINUTE),
            lambda v: v.get("inventory", 0) > 0,
            "completed jobs per minute",
        )
        assert by_queue(board, FAILED_PER_MINUTE).get("mail", 0) == 0
        # Four of five completed runs slept 150 ms: the median is past 0.1 s, and within a
        # second however loaded the machine (not a timing check: a wrong pairing of events
        # would give a time of 0 or of the whole test).
        median = settle(
            lambda: by_outcome(board, RUN_TIME, "P50", "inventory"),
            lambda v: "completed" in v and "failed" in v,
            "run time percentiles of both outcomes",
        )
        assert 0.1 <= median["completed"] <= 1.0
        assert 0 < median["failed"] <= 0.25
        p95 = by_outcome(board, RUN_TIME, "P95", "inventory")
        assert median["completed"] <= p95["completed"] <= 1.0
        # One worker, jobs behind each other: the later ones waited for the earlier ones.
        waited = settle(
            lambda: by_queue(board, WAIT_TIME, "P95"),
            lambda v: v.get("inventory", 0) > 0,
            "the wait time p95",
        )
        assert waited["inventory"] >= by_queue(board, WAIT_TIME, "P50")["inventory"] > 0
        assert board.value(REDIS_SOURCE, "MISSED") == 0
        # Every query of the dashboard, the card's and the history's too, on this good day.
        poll_every_query_returns_data(
            redis_stack.prometheus_port, live_queries(board, REDIS_QUEUES)
        )
    finally:
        driver.close_worker(worker)
    settle(lambda: by_queue(board, WORKERS), lambda w: w.get("inventory") == 0, "no worker")


def failed_per_minute_of(instances: Sequence[str], queue: str) -> str:
    """What the pair's failures per minute would read if the panel added exporters up."""
    return (
        f"sum(rate(jobstats_queue_jobs_failed_total"
        f'{{instance=~"{regex_of(instances)}",queue="{queue}"}}[{RATE_INTERVAL}]) * 60)'
    )


@pytest.mark.integration
def test_an_ha_pair_on_one_redis_is_counted_once(
    dashboard: dict[str, Any], redis_stack: RedisStack
) -> None:
    pair = redis_stack.board(dashboard, "pair_a", "pair_b")
    first = redis_stack.board(dashboard, "pair_a")
    second = redis_stack.board(dashboard, "pair_b")
    driver = redis_stack.shared_driver
    worker = driver.start_worker("mail", "postman")
    try:
        driver.add_bulk("mail", [{"name": "bad", "data": {"ms": 5, "fail": True}}] * 5)
        driver.wait_finished("mail", 6)  # the first job too
    finally:
        driver.close_worker(worker)
    both = [redis_stack.instance("pair_a"), redis_stack.instance("pair_b")]

    def counted_by_each(at: float) -> dict[str, float]:
        """Failures per minute of each exporter alone, at `at`."""
        return {
            name: sum(v for _, v in query_at(port, failed_per_minute_of([i], "mail"), at))
            for name, i in zip(("first", "second"), both, strict=True)
        }

    port = redis_stack.prometheus_port
    settle(
        lambda: counted_by_each(time.time()),
        lambda each: min(each.values()) > 0,
        "both exporters to count the failures",
    )
    at = time.time()
    each = counted_by_each(at)
    shown = {
        name: {
            labels["queue"]: value
            for labels, value in query_at(port, board.exprs(FAILED_PER_MINUTE)["A"], at)
        }
        for name, board in (("pair", pair), ("first", first), ("second", second))
    }
    # Both counted every failure; the pair shows one exporter's count, not their sum.
    assert shown["pair"]["mail"] == pytest.approx(each["first"])
    assert shown["pair"]["mail"] < each["first"] + each["second"]
    # Each replica alone still shows its own view.
    assert shown["first"]["mail"] == pytest.approx(each["first"])
    assert shown["second"]["mail"] == pytest.approx(each["second"])
    # Workers and the oldest waiting job are not doubled either.
    assert by_queue(pair, WORKERS) == by_queue(first, WORKERS)


@pytest.mark.integration
def test_redis_down_shows_down_and_gaps_not_zeros(
    dashboard: dict[str, Any], redis_stack: RedisStack
) -> None:
    board = redis_stack.board(dashboard, "lonely")
    driver = redis_stack.lonely_driver
    worker = driver.start_worker("inventory", "loner")
    driver.add_bulk("inventory", [{"name": "ok", "data": {"ms": 5}}] * 3)
    driver.wait_finished("inventory", 4)
    settle(
        lambda: by_queue(board, COMPLETED_PER_MINUTE),
        lambda v: v.get("inventory", 0) > 0,
        "completed jobs per minute",
    )
    settle(lambda: by_queue(board, WORKERS), lambda w: w.get("inventory") == 1, "one worker")
    redis_stack.lonely.kill()
    try:
        settle(
            lambda: board.shown(REDIS_SOURCE, "STATUS"), lambda s: s == "Down", "Redis source down"
        )

        def still_shown() -> list[str]:
            return [
                f"{title} [{ref}]"
                for title in REDIS_SOURCE_GRAPHS
                for ref in board.exprs(title)
                if board.series(title, ref)
            ]

        # A gap, not a 0: nothing was counted because nothing could be read.
        settle(still_shown, lambda shown: not shown, "the Redis source graphs to be empty")
        # The counters are still there, standing still: the panels hide them on purpose.
        counter = (
            "jobstats_queue_jobs_completed_total"
            f'{{instance="{redis_stack.instance("lonely")}",queue="inventory"}}'
        )
        (answer,) = prometheus_query(redis_stack.prometheus_port, counter)
        assert float(answer["value"][1]) >= 4
        # The API-based panels are unaffected.
        assert board.series("Waiting backlog")
        assert board.shown("Summary", "API") == "OK"
    finally:
        redis_stack.lonely.start()
        with suppress(DriverError, AssertionError):
            driver.close_worker(worker, force=True, timeout=5)


# --- A backend without a stats API: the same dashboard and rules, from Redis alone ----------
#
# Issue 13's "Done when": an exporter pointed at nothing but a real BullMQ's Redis feeds the
# dashboard and the alert rules unchanged. One exporter whose one target has no `url`, on a
# good day: every queue has a worker, a job scheduler, completed and failed jobs.

REDIS_ONLY_QUEUES = ("billing", "mail")


def check_says(config: Path) -> str:
    """The system status `jobstats-exporter check` prints for the target of `config`."""
    result = subprocess.run(
        exporter_command("check", "--config.file", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )
    match = re.search(r"^System: (healthy|needs attention);", result.stdout, re.MULTILINE)
    assert match, f"check exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return match[1]


def alert_names(prometheus_config: Path) -> set[str]:
    """The alerting rules of every rule file `prometheus_config` loads."""
    config = yaml.safe_load(prometheus_config.read_text(encoding="utf-8"))
    names = set()
    for rule_file in config["rule_files"]:
        document = yaml.safe_load(Path(rule_file).read_text(encoding="utf-8"))
        names |= {r["alert"] for g in document["groups"] for r in g["rules"] if "alert" in r}
    return names


def loaded_rules(prometheus_port: int) -> list[dict[str, Any]]:
    """Every rule Prometheus loaded, with its type, name and health."""
    with urlopen(f"http://{HOST}:{prometheus_port}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.integration
def test_a_redis_only_exporter_feeds_the_same_dashboard_and_rules(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    require_tool("prometheus")
    with ExitStack() as stack:
        server = stack.enter_context(running_redis(tmp_path / "redis"))
        driver = stack.enter_context(running_driver(server.url, tmp_path / "driver"))
        config = redis_target_config(tmp_path / "exporter", None, server.url)
        exporter = stack.enter_context(
            running_exporter(["--config.file", str(config)], tmp_path / "exporter")
        )
        instance = f"{HOST}:{exporter.port}"
        prometheus_port = free_port()
        prometheus_config = write_prometheus_config(
            tmp_path,
            exporter_port=exporter.port,
            alertmanager_port=free_port(),
            prometheus_port=prometheus_port,
        )
        stack.enter_context(
            running_prometheus(prometheus_config, tmp_path / "prometheus", prometheus_port)
        )
        board = Board(dashboard, prometheus_port, [instance])
        for queue in REDIS_ONLY_QUEUES:
            driver.open_queue(queue)
            driver.upsert_scheduler(queue, f"{queue}-recurring", pattern="*/6 * * * *")
        # Every queue followed before BullMQ runs a job, so the counters see every event.
        followed = f'count(jobstats_queue_jobs_failed_total{{instance="{instance}"}})'
        settle(
            lambda: prometheus_query(prometheus_port, followed),
            lambda answer: bool(answer) and answer[0]["value"][1] == str(len(REDIS_ONLY_QUEUES)),
            "the exporter to follow every queue",
        )
        for queue in REDIS_ONLY_QUEUES:
            driver.start_worker(queue, f"{queue}-worker")
            jobs = [{"name": "ok", "data": {"ms": 20}} for _ in range(3)]
            jobs += [{"name": "bad", "data": {"ms": 5, "fail": True}} for _ in range(2)]
            driver.add_bulk(queue, jobs)
        for queue in REDIS_ONLY_QUEUES:
            finished = driver.wait_finished(queue, 5)
            assert finished["failed"] == 2, finished

        settle(
            lambda: board.variable("queue"),
            lambda queues: queues == list(REDIS_ONLY_QUEUES),
            "the queue variable to list the queues found in Redis",
        )
        assert board.variable("instance") == [instance]
        # Every query, the card's, the history's and the Redis source's, answers something.
        poll_every_query_returns_data(prometheus_port, live_queries(board, REDIS_ONLY_QUEUES))
        for queue in REDIS_ONLY_QUEUES:
            assert board.shown("$queue", "STATUS", queue=queue) == "Active", queue
            assert board.value("$queue", "FAILED", queue=queue) == 2, queue
        assert board.shown("Redis status", "A") == "Enabled"
        assert board.shown("Redis status", "B") == "Available"
        assert board.shown(REDIS_SOURCE, "STATUS") == "Up"
        assert board.shown("Summary", "API") == "OK"
        # The System status says what `check` says of the same Redis: healthy.
        assert check_says(config) == "healthy"
        settle(lambda: system_status(board), lambda s: s == "healthy", "a healthy system status")

        # The shipped rules load, and count the failures from the event counters.
        rules = loaded_rules(prometheus_port)
        assert [r["name"] for r in rules if r["health"] != "ok"] == []
        expected_alerts = alert_names(prometheus_config)
        assert expected_alerts
        assert {r["name"] for r in rules if r["type"] == "alerting"} == expected_alerts
        new_failed = f'queue:jobstats_failed_jobs:new10m{{instance="{instance}"}}'

        def failures_counted() -> dict[str, tuple[str, float]]:
            return {
                s["metric"]["queue"]: (s["metric"]["source"], float(s["value"][1]))
                for s in prometheus_query(prometheus_port, new_failed)
            }

        counted = settle(
            failures_counted,
            lambda by_queue: (
                set(by_queue) == set(REDIS_ONLY_QUEUES)
                and all(value >= 2 for _, value in by_queue.values())
            ),
            "new10m to count each queue's two failures",
        )
        assert {source for source, _ in counted.values()} == {"events"}
