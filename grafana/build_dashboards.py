"""Build the Grafana dashboards with grafana-foundation-sdk and write their JSON.

`python grafana/build_dashboards.py` rewrites grafana/dashboards/*.json;
`--check` only compares and exits 1 on any difference (the tests do this).
The generated JSON is committed: Grafana provisions it as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.dashboard import FieldColor as FieldColorBuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    BigValueJustifyMode,
    BigValueTextMode,
    GraphDrawStyle,
    LegendDisplayMode,
    LegendPlacement,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    DynamicConfigValue,
    FieldColorModeId,
    GridPos,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

__all__ = ["DASHBOARDS", "DATASOURCE_UID", "main", "overview"]

#: The uid of the provisioned Prometheus data source (grafana/provisioning/datasources).
DATASOURCE_UID = "jobstats-prometheus"
#: The overview's uid; alert notifications link to /d/<uid> (alerts/templates/jobstats.tmpl).
OVERVIEW_UID = "jobstats-overview"
DASHBOARD_DIR = Path(__file__).parent / "dashboards"

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
INSTANCE = 'instance=~"$instance"'
QUEUE = f'{INSTANCE},queue=~"$queue"'

# The admin card's colors.
STATE_COLORS = {
    "waiting": "#8e8e8e",  # gray
    "active": "blue",
    "completed": "green",
    "failed": "red",
    "delayed": "yellow",
}
STATUS_CODES = {"active": (1, "green"), "paused": (2, "yellow"), "stopped": (3, "red")}
UNKNOWN_STATUS = (4, "#8e8e8e")
RECURRING_COLOR = "yellow"
REDIS_COLOR = "blue"


def query(expr: str, legend: str, ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query of the dashboard's data source; instant for the card's big values."""
    built = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)
    return built.instant() if instant else built.range()


def fixed(color: str) -> list[DynamicConfigValue]:
    return [DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]


def mapping(*entries: tuple[int, str, str]) -> ValueMap:
    return ValueMap(
        options={
            str(value): ValueMappingResult(text=label, color=color, index=index)
            for index, (value, label, color) in enumerate(entries)
        }
    )


def steps(*pairs: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in pairs])
    )


def big_values(title: str, position: GridPos) -> stat.Panel:
    """A stat panel that shows every field with its name, colored background, no sparkline."""
    return (
        stat.Panel()
        .title(title)
        .datasource(DS)
        .grid_pos(position)
        .color_mode(BigValueColorMode.BACKGROUND)
        .graph_mode(BigValueGraphMode.NONE)
        .text_mode(BigValueTextMode.VALUE_AND_NAME)
        .justify_mode(BigValueJustifyMode.CENTER)
        .orientation(VizOrientation.AUTO)
    )


def header() -> list[Any]:
    intro = (
        text.Panel()
        .title("")
        .grid_pos(GridPos(h=3, w=18, x=0, y=0))
        .content(
            "## Background Jobs\n"
            "Real-time background job statistics and status. "
            "Refreshes every 30 s; the **Refresh** link above reloads now."
        )
    )
    updated = (
        stat.Panel()
        .title("Last updated")
        .description("When Prometheus last scraped the exporter; Summary says if it got stats.")
        .datasource(DS)
        .grid_pos(GridPos(h=3, w=6, x=18, y=0))
        .with_target(
            query(
                f"max(timestamp(jobstats_up{{{INSTANCE}}})) * 1000",
                "Last updated",
                instant=True,
            )
        )
        .unit("dateTimeFromNow")
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .text_mode(BigValueTextMode.VALUE)
        .no_value("never")
    )
    return [intro, updated]


def redis_status() -> stat.Panel:
    return (
        big_values("Redis status", GridPos(h=3, w=24, x=0, y=3))
        .description("stats.redisStatus and redisAvailable of the job stats API.")
        .with_target(query(f"max(jobstats_redis_enabled{{{INSTANCE}}})", "Redis", "A", True))
        .with_target(query(f"max(jobstats_redis_available{{{INSTANCE}}})", "Connection", "B", True))
        .color_scheme(FieldColorBuilder().mode(FieldColorModeId.FIXED).fixed_color(REDIS_COLOR))
        .override_by_query(
            "A",
            [
                DynamicConfigValue(
                    id_val="mappings",
                    value=[mapping((1, "Enabled", REDIS_COLOR), (0, "Disabled", REDIS_COLOR))],
                )
            ],
        )
        .override_by_query(
            "B",
            [
                DynamicConfigValue(
                    id_val="mappings",
                    value=[mapping((1, "Available", REDIS_COLOR), (0, "Unavailable", "red"))],
                )
            ],
        )
        .no_value("Unknown")
    )


def queue_block() -> stat.Panel:
    """One queue as the card shows it: badge, five counts, recurring jobs. Repeated per queue."""
    # A code per instance, then the worst: one queue on two backends never adds up.
    codes = " + ".join(
        f'{code} * max by (instance) (jobstats_queue_status{{{QUEUE},status="{name}"}})'
        for name, (code, _) in [*STATUS_CODES.items(), ("unknown", UNKNOWN_STATUS)]
    )
    status_code = f"max({codes})"
    panel = (
        big_values("$queue", GridPos(h=9, w=12, x=0, y=6))
        .description("The queue as the admin card shows it. One panel per queue, two per row.")
        .repeat("queue")
        .repeat_direction("h")
        .max_per_row(2)
        .with_target(query(status_code, "Status", "STATUS", True))
        .override_by_query(
            "STATUS",
            [
                DynamicConfigValue(
                    id_val="mappings",
                    value=[
                        mapping(
                            *[
                                (code, name.capitalize(), color)
                                for name, (code, color) in STATUS_CODES.items()
                            ],
                            (UNKNOWN_STATUS[0], "Unknown", UNKNOWN_STATUS[1]),
                        )
                    ],
                )
            ],
        )
    )
    for state, color in STATE_COLORS.items():
        ref = state.upper()
        panel = panel.with_target(
            query(
                f'sum(jobstats_queue_jobs{{{QUEUE},state="{state}"}})',
                state.capitalize(),
                ref,
                True,
            )
        ).override_by_query(ref, fixed(color))
    panel = (
        panel.with_target(
            query(
                f"sum(jobstats_queue_recurring_jobs{{{QUEUE}}})",
                "Recurring jobs",
                "RECURRING",
                True,
            )
        )
        .override_by_query("RECURRING", fixed(RECURRING_COLOR))
        .with_target(
            query(
                f"max by (cron, schedule) (jobstats_queue_cron_interval_seconds{{{QUEUE}}}"
                f" * on (instance, queue) group_left (cron, schedule)"
                f" jobstats_queue_recurring_info{{{QUEUE}}})",
                "{{cron}} · {{schedule}}",
                "SCHEDULE",
                True,
            )
        )
        .override_by_query(
            "SCHEDULE",
            [*fixed(RECURRING_COLOR), DynamicConfigValue(id_val="unit", value="s")],
        )
        .with_target(
            query(
                f"max(jobstats_queue_next_run_timestamp_seconds{{{QUEUE}}}) * 1000",
                "Next run",
                "NEXT_RUN",
                True,
            )
        )
        .override_by_query(
            "NEXT_RUN",
            [*fixed(RECURRING_COLOR), DynamicConfigValue(id_val="unit", value="dateTimeFromNow")],
        )
        .with_target(
            query(
                f"clamp_min(time() - max(jobstats_queue_next_run_timestamp_seconds{{{QUEUE}}}), 0)",
                "Overdue",
                "OVERDUE",
                True,
            )
        )
        .override_by_query(
            "OVERDUE",
            [
                DynamicConfigValue(id_val="unit", value="s"),
                DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
                DynamicConfigValue(
                    id_val="thresholds",
                    value=steps((None, RECURRING_COLOR), (120, "red")).build(),
                ),
            ],
        )
    )
    return panel


def summary() -> stat.Panel:
    system = (
        f"(min(jobstats_up{{{INSTANCE}}}) or vector(0))"
        f" * (min(jobstats_redis_available{{{INSTANCE}}}) or vector(0))"
        f' * ((count(jobstats_queue_status{{{INSTANCE},status!="active"}} == 1)'
        " or vector(0)) == bool 0)"
    )
    return (
        big_values("Summary", GridPos(h=4, w=24, x=0, y=15))
        .description(
            "System status is Healthy when the exporter reads valid stats, Redis is available and"
            " every queue is active. Total completed is the sum of the retained completed jobs."
        )
        .with_target(query(system, "System status", "SYSTEM", True))
        .override_by_query(
            "SYSTEM",
            [
                DynamicConfigValue(
                    id_val="mappings",
                    value=[mapping((1, "Healthy", "green"), (0, "Needs attention", "red"))],
                )
            ],
        )
        .with_target(
            query(
                f'min(up{{job="jobstats",{INSTANCE}}}) or vector(0)', "Exporter", "EXPORTER", True
            )
        )
        .override_by_query(
            "EXPORTER",
            [
                DynamicConfigValue(
                    id_val="mappings", value=[mapping((1, "Up", "green"), (0, "Down", "red"))]
                )
            ],
        )
        .with_target(
            query(f"min(jobstats_up{{{INSTANCE}}}) or vector(0)", "Stats API", "API", True)
        )
        .override_by_query(
            "API",
            [
                DynamicConfigValue(
                    id_val="mappings", value=[mapping((1, "OK", "green"), (0, "Failing", "red"))]
                )
            ],
        )
        .with_target(
            query(
                f'count(jobstats_queue_status{{{INSTANCE},status!="active"}} == 1) or vector(0)',
                "Queues not active",
                "NOT_ACTIVE",
                True,
            )
        )
        .override_by_query(
            "NOT_ACTIVE",
            [
                DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
                DynamicConfigValue(
                    id_val="thresholds", value=steps((None, "green"), (1, "red")).build()
                ),
            ],
        )
        .with_target(
            query(
                f'sum(jobstats_queue_jobs{{{INSTANCE},state="completed"}}) or vector(0)',
                "Total completed",
                "COMPLETED",
                True,
            )
        )
        .override_by_query("COMPLETED", fixed("green"))
    )


def graph(title: str, description: str, position: GridPos) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .grid_pos(position)
        .legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )


def history(top: int) -> list[Any]:
    """What the card could not show: the same numbers over time."""
    y = top + 1
    by_state = (
        graph(
            "Jobs by state: $queue",
            "Counts by state over time. completed and failed are retained counts: they drop when"
            " BullMQ cleans jobs.",
            GridPos(h=8, w=12, x=0, y=y),
        )
        .repeat("queue")
        .repeat_direction("h")
        .max_per_row(2)
        .with_target(query(f"sum by (state) (jobstats_queue_jobs{{{QUEUE}}})", "{{state}}"))
    )
    for state, color in STATE_COLORS.items():
        by_state = by_state.override_by_name(state, fixed(color))
    y += 8
    failures = (
        graph(
            "New failed jobs per minute",
            "Failed jobs that appeared in the last minute, per queue: rises of the retained count,"
            " so a clean of failed jobs is not counted (queue:jobstats_failed_jobs:new1m). A lower"
            " bound while BullMQ removes old failed jobs as new ones fail.",
            GridPos(h=8, w=12, x=0, y=y),
        )
        .with_target(
            query(
                f"sum by (queue) (queue:jobstats_failed_jobs:new1m{{{QUEUE}}})"
                f' or sum by (queue) (jobstats_queue_jobs{{{QUEUE},state="failed"}}) * 0',
                "{{queue}}",
            )
        )
        .draw_style(GraphDrawStyle.BARS)
        .fill_opacity(60)
        .color_scheme(FieldColorBuilder().mode(FieldColorModeId.PALETTE_CLASSIC))
    )
    ratio = (
        graph(
            "Failure ratio (30 min)",
            "Share of failures among the jobs that finished in the last 30 minutes, per queue"
            " (queue:jobstats_finished_jobs:failure_ratio30m); 0 when none finished. The"
            " JobStatsQueueFailureRatioHigh alert fires above 25 %.",
            GridPos(h=8, w=12, x=12, y=y),
        )
        .with_target(
            query(
                f"sum by (queue) (queue:jobstats_finished_jobs:failure_ratio30m{{{QUEUE}}})"
                f' or sum by (queue) (jobstats_queue_jobs{{{QUEUE},state="failed"}}) * 0',
                "{{queue}}",
            )
        )
        .unit("percentunit")
        .min(0)
        .max(1)
    )
    y += 8
    throughput = (
        graph(
            "Throughput: completed jobs per minute",
            "Jobs completed in the last minute, per queue, from rises of the retained completed"
            " count (queue:jobstats_completed_jobs:new1m). A lower bound: while BullMQ removes old"
            " jobs as new ones complete (at its removeOnComplete cap, or trimming by age), the"
            " count stays flat however busy the queue is.",
            GridPos(h=8, w=12, x=0, y=y),
        )
        .with_target(
            query(
                f"sum by (queue) (queue:jobstats_completed_jobs:new1m{{{QUEUE}}})"
                f' or sum by (queue) (jobstats_queue_jobs{{{QUEUE},state="completed"}}) * 0',
                "{{queue}}",
            )
        )
        .unit("short")
    )
    backlog = graph(
        "Waiting backlog",
        "Jobs waiting per queue. JobStatsQueueBacklog fires above 100 when not draining.",
        GridPos(h=8, w=12, x=12, y=y),
    ).with_target(
        query(f'sum by (queue) (jobstats_queue_jobs{{{QUEUE},state="waiting"}})', "{{queue}}")
    )
    y += 8
    availability = (
        graph(
            "Availability",
            "1 when up: the exporter (Prometheus' scrape), the stats API (jobstats_up) and Redis"
            " (redisAvailable).",
            GridPos(h=8, w=12, x=0, y=y),
        )
        .with_target(query(f'min(up{{job="jobstats",{INSTANCE}}}) or vector(0)', "Exporter", "A"))
        .with_target(query(f"min(jobstats_up{{{INSTANCE}}}) or vector(0)", "Stats API", "B"))
        .with_target(
            query(f"min(jobstats_redis_available{{{INSTANCE}}}) or vector(0)", "Redis", "C")
        )
        .min(0)
        .max(1)
    )
    duration = (
        graph(
            "Scrape duration",
            "Time the exporter spent on the upstream call and parse, and Prometheus' whole scrape.",
            GridPos(h=8, w=12, x=12, y=y),
        )
        .with_target(
            query(
                f"max(jobstats_scrape_duration_seconds{{{INSTANCE}}})",
                "upstream call and parse",
                "A",
            )
        )
        .with_target(
            query(f'max(scrape_duration_seconds{{job="jobstats",{INSTANCE}}})', "whole scrape", "B")
        )
        .unit("s")
    )
    y += 8
    errors = graph(
        "Failed scrapes by reason",
        "Scrapes that could not read valid stats, by reason (jobstats_scrape_errors_total).",
        GridPos(h=8, w=12, x=0, y=y),
    ).with_target(
        query(
            "sum by (reason) ("
            f"increase(jobstats_scrape_errors_total{{{INSTANCE}}}[$__rate_interval]))",
            "{{reason}}",
        )
    )
    alerts = (
        table.Panel()
        .title("Firing JobStats alerts")
        .description("Alerts of alerts/jobstats.rules.yml firing now; empty when all is well.")
        .datasource(DS)
        .grid_pos(GridPos(h=8, w=12, x=12, y=y))
        .with_target(
            query('ALERTS{alertname=~"JobStats.+", alertstate="firing"}', "", instant=True).format(
                PromQueryFormat.TABLE
            )
        )
        .no_value("No JobStats alert is firing")
    )
    row = Row("History").grid_pos(GridPos(h=1, w=24, x=0, y=top))
    return [
        row,
        by_state,
        failures,
        ratio,
        throughput,
        backlog,
        availability,
        duration,
        errors,
        alerts,
    ]


def variables() -> list[Any]:
    datasource = (
        DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value=DATASOURCE_UID))
    )
    instance = (
        QueryVariable("instance")
        .label("Instance")
        .datasource(DS)
        .query("label_values(jobstats_up, instance)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .multi(True)
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    queue = (
        QueryVariable("queue")
        .label("Queue")
        .datasource(DS)
        .query(f"label_values(jobstats_queue_jobs{{{INSTANCE}}}, queue)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .multi(True)
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return [datasource, instance, queue]


def overview() -> dict[str, Any]:
    """The "Background Jobs" dashboard: the admin card, then its history."""
    builder = (
        Dashboard("Background Jobs")
        .uid(OVERVIEW_UID)
        .description("Real-time background job statistics and status")
        .tags(["jobstats", "bullmq"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .editable()
        .link(
            DashboardLink("Refresh")
            .type(DashboardLinkType.LINK)
            .url(f"/d/{OVERVIEW_UID}/background-jobs")
            .icon("sync")
            .tooltip("Reload the dashboard now")
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in variables():
        builder = builder.with_variable(variable)
    for panel in [*header(), redis_status(), queue_block(), summary()]:
        builder = builder.with_panel(panel)
    for panel in history(top=19):
        builder = builder.with_row(panel) if isinstance(panel, Row) else builder.with_panel(panel)
    document: dict[str, Any] = json.loads(
        JSONEncoder(sort_keys=True, indent=2).encode(builder.build())
    )
    for number, panel in enumerate(document["panels"], start=1):
        panel["id"] = number
    return document


DASHBOARDS = {"jobstats-overview.json": overview}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = DASHBOARD_DIR / name
        wanted = render(build)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != wanted:
                stale.append(name)
        else:
            path.write_text(wanted, encoding="utf-8")
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python grafana/build_dashboards.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
