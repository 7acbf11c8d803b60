"""Build the Grafana dashboards with grafana-foundation-sdk and write their JSON.

`python grafana/build_dashboards.py` rewrites grafana/dashboards/*.json;
`--check` only compares and exits 1 on any difference (the tests do this).
The generated JSON is committed: Grafana provisions it as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
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
    DataSourceRef,
    DataTransformerConfig,
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

from exporter.card import OVERDUE_GRACE_SECONDS
from exporter.collector import INVALID_SCHEDULE

__all__ = ["DASHBOARDS", "DATASOURCE_UID", "SECTIONS", "main", "overview"]

#: The uid of the provisioned Prometheus data source (grafana/provisioning/datasources).
DATASOURCE_UID = "jobstats-prometheus"
#: The overview's uid; alert notifications link to /d/<uid> (alerts/templates/jobstats.tmpl).
OVERVIEW_UID = "jobstats-overview"
DASHBOARD_DIR = Path(__file__).parent / "dashboards"

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Prometheus' scrape job of the exporter, for the series Prometheus writes itself (`up`).
JOB = 'job="$job"'
INSTANCE = 'instance=~"$instance"'
QUEUE = f'{INSTANCE},queue=~"$queue"'
#: 0 when at least one selected exporter read valid stats, else nothing: a count that is
#: "0" only when it is known, and "Unknown" (the panel's no value) while the API fails.
KNOWN_ZERO = f"0 * max(jobstats_up{{{INSTANCE}}} == 1)"
#: A next run further back than this is overdue, for the card (`check`) and the alert.
OVERDUE = (
    f"time() - jobstats_queue_next_run_timestamp_seconds{{{INSTANCE}}} > {OVERDUE_GRACE_SECONDS}"
)
#: The rows below the card whose queries read the recording rules say so when empty.
NO_RULES = "No data: are the recording rules of alerts/jobstats.rules.yml loaded?"
#: The Redis source panels when empty: none configured, or it cannot be read right now.
NO_REDIS_SOURCE = (
    "No data: no Redis source configured, or the exporter cannot read it now (see Redis source"
    " above)"
)
#: One exporter per job and queue, as the rules read it: an HA pair on one Redis is never
#: added up (alerts/jobstats.rules.yml, queue:jobstats_event_counters:selected).
SELECTED = "on (job, instance, queue) queue:jobstats_event_counters:selected"
#: Only while the exporter reads Redis: its counters stand still meanwhile, and a rate of 0
#: would say no job finished.
READING_REDIS = "on (job, instance) (jobstats_redis_up == 1)"
#: The percentiles of the wait and run time panels.
PERCENTILES = (0.5, 0.95)

# The admin card's colors.
GRAY = "#8e8e8e"
STATE_COLORS = {
    "waiting": GRAY,
    "active": "blue",
    "completed": "green",
    "failed": "red",
    "delayed": "yellow",
}
STATUS_CODES = {"active": (1, "green"), "paused": (2, "yellow"), "stopped": (3, "red")}
UNKNOWN_STATUS = (4, GRAY)
RECURRING_COLOR = "yellow"
REDIS_COLOR = "blue"
#: Redis connection, worst last, with the card's words (exporter/card.py).
CONNECTION_CODES = (
    (1, "Available", REDIS_COLOR),
    (2, "Availability not reported", GRAY),
    (3, "Unavailable", "red"),
)
#: The exporter's own connection to BullMQ's Redis (jobstats_redis_up), as the panel words it.
REDIS_SOURCE_CODES = ((1, "Up", "green"), (0, "Down", "red"), (2, "Not configured", GRAY))
#: The card's system status words (exporter/card.py), as the big value shows them.
HEALTHY, NEEDS_ATTENTION = "Healthy", "Needs attention"
#: The value of the schedule stat for a cron pattern BullMQ cannot run: no period exists.
INVALID_CRON_VALUE = 0

#: A section of the dashboard: its panels placed from row `top` down, and its height.
Section = Callable[[int], tuple[list[Any], int]]
#: A panel placed at row `top`.
PanelAt = Callable[[int], Any]


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


def mapped_as(*entries: tuple[int, str, str]) -> list[DynamicConfigValue]:
    """An override that shows a query's codes as words in colors."""
    return [DynamicConfigValue(id_val="mappings", value=[mapping(*entries)])]


def steps(*pairs: tuple[float | None, str]) -> ThresholdsConfig:
    return (
        ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in pairs])
    )


def red_from(value: float, below: str = "green") -> list[DynamicConfigValue]:
    """An override coloring a count `below` under `value` and red from it."""
    return [
        DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
        DynamicConfigValue(id_val="thresholds", value=steps((None, below), (value, "red")).build()),
    ]


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


def row(title: str, top: int) -> Row:
    """A row header at `top`; the panels of its section go below it."""
    return Row(title).grid_pos(GridPos(h=1, w=24, x=0, y=top))


def half(top: int, right: bool = False, height: int = 8) -> GridPos:
    """The left or right half of the dashboard at `top`."""
    return GridPos(h=height, w=12, x=12 if right else 0, y=top)


# --- The admin card -----------------------------------------------------------------------


def last_updated_expr() -> str:
    """When the stats on screen were read from the API: the oldest among the exporters scraped.

    Only a scrape that got stats carries jobstats_result_age_seconds, and its sample's
    timestamp minus the age is when the answer was fetched; a failing API leaves it behind.
    """
    fetched = (
        f"timestamp(jobstats_result_age_seconds{{{INSTANCE}}})"
        f" - jobstats_result_age_seconds{{{INSTANCE}}}"
    )
    return (
        f"min(max by (instance) (max_over_time(({fetched})[$__range:]))"
        f" and on (instance) up{{{JOB},{INSTANCE}}}) * 1000"
    )


def header(top: int) -> tuple[list[Any], int]:
    intro = (
        text.Panel()
        .title("")
        .grid_pos(GridPos(h=3, w=18, x=0, y=top))
        .content(
            "## Background Jobs\n"
            "Real-time background job statistics and status. "
            "Refreshes every 30 s; Grafana's refresh button (top right) reloads now."
        )
    )
    updated = (
        stat.Panel()
        .title("Last updated")
        .description(
            "When the stats shown were read from the job stats API: it stops moving while the"
            " API fails. With several exporters, the oldest."
        )
        .datasource(DS)
        .grid_pos(GridPos(h=3, w=6, x=18, y=top))
        .with_target(query(last_updated_expr(), "Last updated", instant=True))
        .unit("dateTimeFromNow")
        .color_mode(BigValueColorMode.NONE)
        .graph_mode(BigValueGraphMode.NONE)
        .text_mode(BigValueTextMode.VALUE)
        .no_value("never")
    )
    return [intro, updated], 3


def redis_connection_expr() -> str:
    """Per exporter: 1 available, 2 not reported (stats read, no redisAvailable), 3 not; worst."""
    return (
        f"max(3 - 2 * max by (instance) (jobstats_redis_available{{{INSTANCE}}})"
        f" or on (instance) 2 * max by (instance) (jobstats_up{{{INSTANCE}}} == 1))"
    )


def redis_status(top: int) -> tuple[list[Any], int]:
    panel = (
        big_values("Redis status", GridPos(h=3, w=24, x=0, y=top))
        .description(
            "stats.redisStatus and redisAvailable of the job stats API; with several exporters,"
            " the worst. Unknown while no exporter reads the API."
        )
        .with_target(query(f"min(jobstats_redis_enabled{{{INSTANCE}}})", "Redis", "A", True))
        .with_target(query(redis_connection_expr(), "Connection", "B", True))
        .color_scheme(FieldColorBuilder().mode(FieldColorModeId.FIXED).fixed_color(REDIS_COLOR))
        .override_by_query(
            "A", mapped_as((1, "Enabled", REDIS_COLOR), (0, "Disabled", REDIS_COLOR))
        )
        .override_by_query("B", mapped_as(*CONNECTION_CODES))
        .no_value("Unknown")
    )
    return [panel], 3


def schedule_expr() -> str:
    """The period of each cron pattern, labelled with the pattern and its words.

    A pattern BullMQ cannot run has no period; it shows as INVALID_CRON_VALUE with its
    words, "invalid cron pattern", instead of vanishing.
    """
    return (
        f"max by (cron, schedule) (jobstats_queue_cron_interval_seconds{{{QUEUE}}}"
        f" * on (instance, queue) group_left (cron, schedule)"
        f" jobstats_queue_recurring_info{{{QUEUE}}}"
        f" or {INVALID_CRON_VALUE}"
        f' * jobstats_queue_recurring_info{{{QUEUE},schedule="{INVALID_SCHEDULE}"}})'
    )


def queue_block(top: int) -> tuple[list[Any], int]:
    """One queue as the card shows it: badge, five counts, recurring jobs. Repeated per queue."""
    # A code per instance, then the worst: one queue on two backends never adds up.
    codes = " + ".join(
        f'{code} * max by (instance) (jobstats_queue_status{{{QUEUE},status="{name}"}})'
        for name, (code, _) in [*STATUS_CODES.items(), ("unknown", UNKNOWN_STATUS)]
    )
    status_code = f"max({codes})"
    panel = (
        big_values("$queue", GridPos(h=9, w=12, x=0, y=top))
        .description("The queue as the admin card shows it. One panel per queue, two per row.")
        .repeat("queue")
        .repeat_direction("h")
        .max_per_row(2)
        .with_target(query(status_code, "Status", "STATUS", True))
        .override_by_query(
            "STATUS",
            mapped_as(
                *[(code, name.capitalize(), color) for name, (code, color) in STATUS_CODES.items()],
                (UNKNOWN_STATUS[0], "Unknown", UNKNOWN_STATUS[1]),
            ),
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
        .with_target(query(schedule_expr(), "{{cron}} · {{schedule}}", "SCHEDULE", True))
        .override_by_query(
            "SCHEDULE",
            [
                *fixed(RECURRING_COLOR),
                DynamicConfigValue(id_val="unit", value="s"),
                *mapped_as((INVALID_CRON_VALUE, INVALID_SCHEDULE, "red")),
            ],
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
                *red_from(OVERDUE_GRACE_SECONDS, below=RECURRING_COLOR),
            ],
        )
    )
    return [panel], 9


def system_status_expr() -> str:
    """1 (Healthy) when every selected exporter is healthy as `check` judges; else 0.

    `check` (exporter/card.py) calls the system healthy when it read the stats, Redis is
    not reported unavailable, every queue is active, no schedule is overdue past the
    grace and no queue entry was skipped as malformed. Here also the exporter must be up.
    """
    return (
        f"(min(up{{{JOB},{INSTANCE}}}) or vector(0))"
        f" * (min(jobstats_up{{{INSTANCE}}}) or vector(0))"
        f" * (min(jobstats_redis_available{{{INSTANCE}}}) or vector(1))"
        f' * ((count(jobstats_queue_status{{{INSTANCE},status!="active"}} == 1)'
        " or vector(0)) == bool 0)"
        f" * ((count({OVERDUE}) or vector(0)) == bool 0)"
        f" * ((sum(jobstats_invalid_queues{{{INSTANCE}}}) or vector(0)) == bool 0)"
    )


def summary(top: int) -> tuple[list[Any], int]:
    panel = (
        big_values("Summary", GridPos(h=4, w=24, x=0, y=top))
        .description(
            "System status says what `jobstats-exporter check` says: Healthy when the exporter"
            " reads valid stats, Redis is not reported unavailable, every queue is active, no"
            f" schedule is more than {OVERDUE_GRACE_SECONDS} s overdue and no queue entry is"
            " skipped as malformed. The counts are Unknown while no exporter reads the API."
            " Total completed is the sum of the retained completed jobs."
        )
        .with_target(query(system_status_expr(), "System status", "SYSTEM", True))
        .override_by_query("SYSTEM", mapped_as((1, HEALTHY, "green"), (0, NEEDS_ATTENTION, "red")))
        .with_target(
            query(f"min(up{{{JOB},{INSTANCE}}}) or vector(0)", "Exporter", "EXPORTER", True)
        )
        .override_by_query("EXPORTER", mapped_as((1, "Up", "green"), (0, "Down", "red")))
        .with_target(
            query(f"min(jobstats_up{{{INSTANCE}}}) or vector(0)", "Stats API", "API", True)
        )
        .override_by_query("API", mapped_as((1, "OK", "green"), (0, "Failing", "red")))
        .with_target(
            query(
                f'count(jobstats_queue_status{{{INSTANCE},status!="active"}} == 1) or {KNOWN_ZERO}',
                "Queues not active",
                "NOT_ACTIVE",
                True,
            )
        )
        .override_by_query("NOT_ACTIVE", red_from(1))
        .with_target(
            query(f"count({OVERDUE}) or {KNOWN_ZERO}", "Overdue schedules", "OVERDUE", True)
        )
        .override_by_query("OVERDUE", red_from(1))
        .with_target(
            query(
                f"sum(jobstats_invalid_queues{{{INSTANCE}}}) or {KNOWN_ZERO}",
                "Skipped malformed queues",
                "INVALID",
                True,
            )
        )
        .override_by_query("INVALID", red_from(1))
        .with_target(
            query(
                f'sum(jobstats_queue_jobs{{{INSTANCE},state="completed"}}) or {KNOWN_ZERO}',
                "Total completed",
                "COMPLETED",
                True,
            )
        )
        .override_by_query("COMPLETED", fixed("green"))
        .no_value("Unknown")
    )
    return [panel], 4


# --- The Redis source: every job from BullMQ's event streams ------------------------------


def one_exporter(series: str, by: str = "queue", combine: str = "sum") -> str:
    """`series` as one exporter per job and queue sees it, only while it reads Redis.

    Two exporters on one Redis (an HA pair) each count every event: the exporters the rules
    select (queue:jobstats_event_counters:selected, as the alerts read them) are combined,
    which keeps two backends served by one exporter apart; where none of the instances shown
    is selected (one replica picked, or the rules not loaded), the largest view is shown.
    """
    reading = f"{series} and {READING_REDIS}"
    return f"{combine} by ({by}) ({reading} and {SELECTED}) or max by ({by}) ({reading})"


def redis_source_status_expr() -> str:
    """Per exporter 1 up, 0 down, the worst; 2 for a scraped exporter with no Redis source."""
    return f"min(jobstats_redis_up{{{INSTANCE}}}) or 2 * max(up{{{JOB},{INSTANCE}}} == 1)"


def missed_entries_expr() -> str:
    """Stream entries trimmed before the selected exporters read them, in the time range."""
    missed = f"increase(jobstats_queue_events_missed_total{{{QUEUE}}}[$__range])"
    return f"sum({missed} and {SELECTED})"


def redis_source_summary(top: int) -> stat.Panel:
    return (
        big_values("Redis source", GridPos(h=3, w=24, x=0, y=top))
        .description(
            "The exporter's own connection to BullMQ's Redis (jobstats_redis_up): Up, Down (its"
            " counters stand still and the panels below show nothing rather than 0) or Not"
            " configured (no redis section for the target); with several exporters, the worst."
            " Missed entries: event stream entries trimmed before the exporter read them, in the"
            " time range shown; above 0, the counts below are low."
        )
        .with_target(query(redis_source_status_expr(), "Redis source", "STATUS", True))
        .override_by_query("STATUS", mapped_as(*REDIS_SOURCE_CODES))
        .with_target(query(missed_entries_expr(), "Missed entries", "MISSED", True))
        .override_by_query("MISSED", red_from(1))
        .no_value("Unknown")
    )


def counted_jobs_per_minute(outcome: str, right: bool) -> PanelAt:
    counter = f"jobstats_queue_jobs_{outcome}_total"

    def build(top: int) -> timeseries.Panel:
        return (
            graph(
                f"{outcome.capitalize()} jobs per minute (event counters)",
                f"Every job that {outcome} per minute, per queue, counted from BullMQ's event"
                f" stream ({counter}); exact however few jobs BullMQ retains. One exporter per"
                " queue (queue:jobstats_event_counters:selected): an HA pair on the same Redis"
                " counts every job once. A gap while the exporter cannot read Redis.",
                half(top, right),
            )
            .with_target(
                query(
                    one_exporter(f"rate({counter}{{{QUEUE}}}[$__rate_interval]) * 60"),
                    "{{queue}}",
                )
            )
            .unit("suffix:/min")
            .min(0)
            .color_scheme(FieldColorBuilder().mode(FieldColorModeId.PALETTE_CLASSIC))
            .no_value(NO_REDIS_SOURCE)
            .draw_style(GraphDrawStyle.BARS if outcome == "failed" else GraphDrawStyle.LINE)
            .fill_opacity(60 if outcome == "failed" else 10)
        )

    return build


def percentile_expr(histogram: str, quantile: float, by: str) -> str:
    """The `quantile` of `histogram` over $__rate_interval; nothing where no job was timed."""
    buckets = f"rate({histogram}_bucket{{{QUEUE}}}[$__rate_interval])"
    return f"histogram_quantile({quantile:g}, {one_exporter(buckets, f'{by}, le')}) >= 0"


def percentiles(title: str, description: str, histogram: str, by: str, legend: str) -> PanelAt:
    def build(top: int) -> timeseries.Panel:
        panel = graph(title, description, half(top, right=histogram.endswith("run_seconds")))
        for quantile in PERCENTILES:
            panel = panel.with_target(
                query(
                    percentile_expr(histogram, quantile, by),
                    f"{legend} p{quantile * 100:g}",
                    f"P{quantile * 100:g}",
                )
            )
        return panel.unit("s").min(0).no_value(NO_REDIS_SOURCE)

    return build


wait_percentiles = percentiles(
    "Wait time p50 / p95 (event streams)",
    "How long jobs waited from ready to active, per queue: the 50th and 95th percentile of"
    " jobstats_queue_job_wait_seconds over the graph's rate interval (buckets 0.005 s to 1 h)."
    " A gap where no job started, or while the exporter cannot read Redis.",
    "jobstats_queue_job_wait_seconds",
    "queue",
    "{{queue}}",
)
run_percentiles = percentiles(
    "Run time p50 / p95 (event streams)",
    "How long an attempt ran, per queue and outcome (completed; failed, retried attempts"
    " included): the 50th and 95th percentile of jobstats_queue_job_run_seconds over the"
    " graph's rate interval (buckets 0.005 s to 1 h). A gap where no attempt ended, or while"
    " the exporter cannot read Redis.",
    "jobstats_queue_job_run_seconds",
    "queue, outcome",
    "{{queue}} {{outcome}}",
)


def oldest_waiting(top: int) -> timeseries.Panel:
    return (
        graph(
            "Oldest waiting job",
            "Age of the job that has waited longest per queue (wait list and prioritized; 0 when"
            " none waits), read from Redis at each scrape. JobStatsQueueJobsWaitingTooLong fires"
            " above 600 s. A gap while the exporter cannot read Redis.",
            half(top),
        )
        .with_target(
            query(
                one_exporter(
                    f"jobstats_queue_oldest_waiting_job_age_seconds{{{QUEUE}}}", combine="max"
                ),
                "{{queue}}",
            )
        )
        .unit("s")
        .min(0)
        .no_value(NO_REDIS_SOURCE)
    )


def workers(top: int) -> timeseries.Panel:
    return (
        graph(
            "Workers",
            "BullMQ workers connected per queue (their named connections in Redis' CLIENT LIST)."
            " 0 means no worker takes jobs. A gap while the exporter cannot read Redis, or where"
            " the server refuses CLIENT LIST.",
            half(top, right=True),
        )
        .with_target(query(one_exporter(f"jobstats_queue_workers{{{QUEUE}}}"), "{{queue}}"))
        .min(0)
        .decimals(0)
        .no_value(NO_REDIS_SOURCE)
    )


def redis_source(top: int) -> tuple[list[Any], int]:
    """What the card never had, from BullMQ's event streams: a target's Redis source."""
    panels: list[Any] = [row("Redis source: every job, from BullMQ's event streams", top)]
    panels.append(redis_source_summary(top + 1))
    y = top + 4
    for pair in (
        (counted_jobs_per_minute("failed", False), counted_jobs_per_minute("completed", True)),
        (wait_percentiles, run_percentiles),
        (oldest_waiting, workers),
    ):
        panels.extend(build(y) for build in pair)
        y += 8
    return panels, y - top


# --- History ------------------------------------------------------------------------------


def jobs_by_state(top: int) -> timeseries.Panel:
    panel = (
        graph(
            "Jobs by state: $queue",
            "Counts by state over time. completed and failed are retained counts: they drop when"
            " BullMQ cleans jobs.",
            half(top),
        )
        .repeat("queue")
        .repeat_direction("h")
        .max_per_row(2)
        .with_target(query(f"sum by (state) (jobstats_queue_jobs{{{QUEUE}}})", "{{state}}"))
    )
    for state, color in STATE_COLORS.items():
        panel = panel.override_by_name(state, fixed(color))
    return panel


def new_failed_jobs(top: int) -> timeseries.Panel:
    return (
        graph(
            "New failed jobs per minute",
            "Failed jobs that appeared in the last minute, per queue: rises of the retained count,"
            " so a clean of failed jobs is not counted (queue:jobstats_failed_jobs:new1m). A lower"
            " bound while BullMQ removes old failed jobs as new ones fail. No data without the"
            " recording rules.",
            half(top),
        )
        .with_target(
            query(f"sum by (queue) (queue:jobstats_failed_jobs:new1m{{{QUEUE}}})", "{{queue}}")
        )
        .draw_style(GraphDrawStyle.BARS)
        .fill_opacity(60)
        .color_scheme(FieldColorBuilder().mode(FieldColorModeId.PALETTE_CLASSIC))
        .no_value(NO_RULES)
    )


def failure_ratio_expr() -> str:
    """Failed over finished in 30 minutes, per queue, summed before dividing.

    Dividing the sums stays a ratio with several exporters: an HA pair counts every job
    twice on both sides, a restarted exporter splits them in time.
    """
    failed = f"sum by (queue) (queue:jobstats_failed_jobs:new30m{{{QUEUE}}})"
    finished = (
        f"sum by (queue) (queue:jobstats_failed_jobs:new30m{{{QUEUE}}}"
        f" + queue:jobstats_completed_jobs:new30m{{{QUEUE}}})"
    )
    return f"{failed} / ({finished} > 0) or {failed} * 0"


def failure_ratio(top: int) -> timeseries.Panel:
    return (
        graph(
            "Failure ratio (30 min)",
            "Share of failures among the jobs that finished in the last 30 minutes, per queue,"
            " over every selected exporter (queue:jobstats_failed_jobs:new30m and"
            " queue:jobstats_completed_jobs:new30m); 0 when none finished. The"
            " JobStatsQueueFailureRatioHigh alert fires above 25 %. No data without the"
            " recording rules.",
            half(top, right=True),
        )
        .with_target(query(failure_ratio_expr(), "{{queue}}"))
        .unit("percentunit")
        .min(0)
        .max(1)
        .no_value(NO_RULES)
    )


def throughput(top: int) -> timeseries.Panel:
    return (
        graph(
            "Throughput: completed jobs per minute",
            "Jobs completed in the last minute, per queue, from rises of the retained completed"
            " count (queue:jobstats_completed_jobs:new1m). A lower bound: while BullMQ removes old"
            " jobs as new ones complete (at its removeOnComplete cap, or trimming by age), the"
            " count stays flat however busy the queue is. No data without the recording rules.",
            half(top),
        )
        .with_target(
            query(f"sum by (queue) (queue:jobstats_completed_jobs:new1m{{{QUEUE}}})", "{{queue}}")
        )
        .unit("short")
        .no_value(NO_RULES)
    )


def waiting_backlog(top: int) -> timeseries.Panel:
    return graph(
        "Waiting backlog",
        "Jobs waiting per queue. JobStatsQueueBacklog fires above 100 when not draining.",
        half(top, right=True),
    ).with_target(
        query(f'sum by (queue) (jobstats_queue_jobs{{{QUEUE},state="waiting"}})', "{{queue}}")
    )


def availability(top: int) -> timeseries.Panel:
    return (
        graph(
            "Availability",
            "1 when up: the exporter (Prometheus' scrape of job $job), the stats API (jobstats_up)"
            " and Redis (redisAvailable; a gap while unknown or not reported).",
            half(top),
        )
        .with_target(query(f"min(up{{{JOB},{INSTANCE}}}) or vector(0)", "Exporter", "A"))
        .with_target(query(f"min(jobstats_up{{{INSTANCE}}}) or vector(0)", "Stats API", "B"))
        .with_target(query(f"min(jobstats_redis_available{{{INSTANCE}}})", "Redis", "C"))
        .min(0)
        .max(1)
    )


def scrape_duration(top: int) -> timeseries.Panel:
    return (
        graph(
            "Scrape duration",
            "Time the exporter spent on the upstream call and parse, and Prometheus' whole scrape.",
            half(top, right=True),
        )
        .with_target(
            query(
                f"max(jobstats_scrape_duration_seconds{{{INSTANCE}}})",
                "upstream call and parse",
                "A",
            )
        )
        .with_target(
            query(f"max(scrape_duration_seconds{{{JOB},{INSTANCE}}})", "whole scrape", "B")
        )
        .unit("s")
    )


def failed_scrapes(top: int) -> timeseries.Panel:
    return (
        graph(
            "Failed scrapes per minute, by reason",
            "Scrapes that could not read valid stats, per minute whatever the time range, by"
            " reason (jobstats_scrape_errors_total).",
            half(top),
        )
        .with_target(
            query(
                "sum by (reason) ("
                f"rate(jobstats_scrape_errors_total{{{INSTANCE}}}[$__rate_interval])) * 60",
                "{{reason}}",
            )
        )
        .unit("suffix:/min")
        .min(0)
    )


#: Columns of the firing alerts table, in order; the rest of ALERTS' labels are hidden.
ALERT_COLUMNS = ("alertname", "severity", "queue", "status", "instance")
ALERT_HIDDEN = ("Time", "Value", "__name__", "alertstate", "job")


def firing_alerts(top: int) -> table.Panel:
    # An alert without an instance (JobStatsExporterDown from absent()) concerns every one.
    expr = 'ALERTS{alertname=~"JobStats.+",alertstate="firing",instance=~"$instance|"}'
    return (
        table.Panel()
        .title("Firing JobStats alerts")
        .description(
            "Alerts of alerts/jobstats.rules.yml firing now for the selected instances, and"
            " those about no instance in particular; empty when all is well."
        )
        .datasource(DS)
        .grid_pos(half(top, right=True))
        .with_target(query(expr, "", instant=True).format(PromQueryFormat.TABLE))
        .with_transformation(
            DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": dict.fromkeys(ALERT_HIDDEN, True),
                    "indexByName": {name: index for index, name in enumerate(ALERT_COLUMNS)},
                },
            )
        )
        .no_value("No JobStats alert is firing")
    )


def history(top: int) -> tuple[list[Any], int]:
    """What the card could not show: the same numbers over time, two graphs a row."""
    y = top + 1
    panels: list[Any] = [row("History", top)]
    for pair in (
        (jobs_by_state,),
        (new_failed_jobs, failure_ratio),
        (throughput, waiting_backlog),
        (availability, scrape_duration),
        (failed_scrapes, firing_alerts),
    ):
        panels.extend(build(y) for build in pair)
        y += 8
    return panels, y - top


# --- The dashboard ------------------------------------------------------------------------


def variables() -> list[Any]:
    datasource = (
        DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value=DATASOURCE_UID))
    )
    job = (
        QueryVariable("job")
        .label("Job")
        .description("Prometheus' scrape job of the exporter")
        .datasource(DS)
        .query("label_values(jobstats_up, job)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .current(VariableOption(selected=True, text="jobstats", value="jobstats"))
    )
    # From `up`, so an exporter that Prometheus cannot scrape is still listed.
    instance = (
        QueryVariable("instance")
        .label("Instance")
        .datasource(DS)
        .query(f"label_values(up{{{JOB}}}, instance)")
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
        .query(f"query_result({queue_list_expr()})")
        .regex(QUEUE_REGEX)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .include_all(True)
        .multi(True)
        .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return [datasource, job, instance, queue]


#: Picks the queue out of a query_result line, `{queue="emails"} 1 1700000000000`.
QUEUE_REGEX = '/^\\{queue="(.*)"\\} /'


def queue_list_expr() -> str:
    """The queues in the API's answer now, as the card lists them.

    An exporter that reads no stats now (API down) but is still scraped keeps the queues it
    last saw in the time range, so their history stays one click away.
    """
    return (
        f"max by (queue) (jobstats_queue_status{{{INSTANCE}}})"
        f" or max by (queue) (last_over_time(jobstats_queue_status{{{INSTANCE}}}[$__range])"
        f" unless on (instance) (jobstats_up{{{INSTANCE}}} == 1)"
        f" and on (instance) up{{{JOB},{INSTANCE}}})"
    )


#: The overview from the top down; a new row is one more function here.
SECTIONS: tuple[Section, ...] = (
    header,
    redis_status,
    queue_block,
    summary,
    redis_source,
    history,
)


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
    )
    for variable in variables():
        builder = builder.with_variable(variable)
    top = 0
    for section in SECTIONS:
        panels, height = section(top)
        for panel in panels:
            builder = (
                builder.with_row(panel) if isinstance(panel, Row) else builder.with_panel(panel)
            )
        top += height
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
