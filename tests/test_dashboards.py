"""The Grafana dashboard: generated from code, shaped like the admin card, well-formed."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerting_stack import (
    poll,
    prometheus_query,
    require_tool,
    running_prometheus,
    write_prometheus_config,
)
from upstream import HOST, free_port, running_exporter

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
OVERVIEW = GRAFANA / "dashboards" / "jobstats-overview.json"
SPEC = importlib.util.spec_from_file_location("build_dashboards", GRAFANA / "build_dashboards.py")
assert SPEC is not None
assert SPEC.loader is not None
BUILD = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(BUILD)
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
    (refresh,) = [link for link in dashboard["links"] if link["title"] == "Refresh"]
    assert refresh["url"] == "/d/jobstats-overview/background-jobs"


def test_redis_panel_is_blue_with_enabled_and_available(dashboard: dict[str, Any]) -> None:
    redis = panel(dashboard, "Redis status")
    assert redis["fieldConfig"]["defaults"]["color"] == {"fixedColor": "blue", "mode": "fixed"}
    assert mapped(redis, "A") == {"1": ("Enabled", "blue"), "0": ("Disabled", "blue")}
    assert mapped(redis, "B") == {"1": ("Available", "blue"), "0": ("Unavailable", "red")}


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
        "Firing JobStats alerts",
    } <= titles


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


def test_variables_are_datasource_instance_and_multi_value_queue(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "queue"]
    queue = variables["queue"]
    assert queue["multi"] is True
    assert queue["includeAll"] is True
    assert queue["current"]["value"] == ["$__all"]
    assert "label_values(jobstats_queue_jobs" in queue["query"]


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


# --- Every query on live data -------------------------------------------------------------

#: A query allowed to return nothing: it lists firing alerts, none when all is well.
MAY_BE_EMPTY = {"Firing JobStats alerts"}
#: The demo's queues (exporter/demo.py).
DEMO_QUEUES = ("emails", "inventory", "product")


def regex_escape(value: str) -> str:
    """A label value as Grafana writes it into a Prometheus regex, in a PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def substituted(expr: str, instance: str, queue: str) -> str:
    """`expr` with the dashboard variables set as Grafana sets them."""
    return (
        expr.replace("$instance", instance)
        .replace("$queue", queue)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
    )


def live_queries(dashboard: dict[str, Any], instance: str) -> list[tuple[str, str, str]]:
    """(panel title, query ref, PromQL) of every panel; a repeated panel once per queue."""
    all_queues = "(" + "|".join(regex_escape(q) for q in DEMO_QUEUES) + ")"
    found = []
    for p in panels(dashboard):
        queues = DEMO_QUEUES if p.get("repeat") == "queue" else (None,)
        for queue in queues:
            value = regex_escape(queue) if queue else all_queues
            title = p["title"].replace("$queue", queue or "")
            for target in p.get("targets", []):
                found.append((title, target["refId"], substituted(target["expr"], instance, value)))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(selector, label) lists the label's values of the selector's series.
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
            assert match, variable["query"]
            expr = f"count by ({match[2]}) ({match[1]})"
            found.append((f"variable {variable['name']}", "", substituted(expr, instance, ".*")))
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
            instance = regex_escape(f"{HOST}:{exporter.port}")
            queries = live_queries(dashboard, instance)
            assert len(queries) > 30

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
