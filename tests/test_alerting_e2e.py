"""End to end: the shipped rules and Alertmanager config, on the real binaries, to a webhook.

The exporter reads a fake stats API; a real Prometheus scrapes it with a copy of the
shipped rules whose durations are shortened; a real Alertmanager with a copy of the shipped
config delivers to a sink in this process. Everything listens on 127.0.0.1 only; every
wait polls against a deadline.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerting_stack import (
    SHIPPED_ALERTMANAGER,
    SHIPPED_PROMETHEUS,
    ServiceProcess,
    WebhookSink,
    alertmanager_alerts,
    poll,
    post_alerts,
    prometheus_alerts,
    prometheus_query,
    require_tool,
    running_alertmanager,
    running_prometheus,
    write_alertmanager_config,
    write_prometheus_config,
)
from upstream import HOST, Answer, ExporterProcess, FakeStatsApi, free_port, running_exporter

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "samples"
#: How long a test waits for one step of the stack (a scrape, an evaluation, a notification).
PATIENCE = 30.0
#: The rules' runbook_url, relative to the template's base address (the alert's exporter).
RUNBOOKS = "runbooks"
DASHBOARD = "http://localhost:3000/d/jobstats-overview/background-jobs"
#: The severity each alert carries in the shipped rules (JobStatsQueueNotActive: when stopped).
SEVERITY = {
    "JobStatsExporterDown": "critical",
    "JobStatsApiDown": "critical",
    "JobStatsRedisUnavailable": "critical",
    "JobStatsQueueFailedJobs": "warning",
    "JobStatsQueueFailureRatioHigh": "warning",
    "JobStatsQueueNotActive": "critical",
    "JobStatsQueueBacklog": "warning",
    "JobStatsRecurringJobOverdue": "critical",
    "JobStatsInvalidQueuePayload": "info",
    "JobStatsQueueJobsWaitingTooLong": "warning",
    "JobStatsRedisSourceDown": "warning",
    "JobStatsEventsMissed": "info",
}


def enabled(failed_on_inventory: int | None = None) -> Answer:
    """enabled.json (inventory failed=3, product failed=0), optionally with more failures.

    The sample's `nextRun` is a fixed instant that the clock passes; here it lies ahead, as
    on a healthy backend, so that no recurring job is overdue while a test runs.
    """
    document = json.loads((SAMPLES / "enabled.json").read_text(encoding="utf-8"))
    next_run = int((datetime.now(UTC) + timedelta(hours=1)).timestamp() * 1000)
    for queue in ("inventory", "product"):
        document["stats"][queue]["recurringJobs"]["nextRun"] = next_run
    if failed_on_inventory is not None:
        document["stats"]["inventory"]["failed"] = failed_on_inventory
    return Answer(body=json.dumps(document).encode("utf-8"))


def labels_match(alert: dict[str, Any], **labels: str) -> bool:
    return all(alert["labels"].get(name) == value for name, value in labels.items())


# --- The test copies of the shipped files ------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="module")
def amtool() -> str:
    return require_tool("amtool")


def check(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{argv}:\n{result.stdout}{result.stderr}"


def test_test_copies_of_the_shipped_configs_pass_promtool_and_amtool(
    promtool: str, amtool: str, tmp_path: Path
) -> None:
    prometheus_config = write_prometheus_config(
        tmp_path / "prometheus",
        exporter_port=free_port(),
        alertmanager_port=free_port(),
        prometheus_port=free_port(),
    )
    alertmanager_config = write_alertmanager_config(
        tmp_path / "alertmanager", sink_url=f"http://{HOST}:{free_port()}"
    )

    check([promtool, "check", "config", str(prometheus_config)])
    check([amtool, "check-config", str(alertmanager_config)])


DURATION = re.compile(r"\b\d+(?:ms|s|m|h|d|w|y)\b")


def without_durations(document: Any) -> Any:
    """`document` with every duration in its strings masked, so copies compare equal to it."""
    if isinstance(document, dict):
        return {key: without_durations(value) for key, value in document.items()}
    if isinstance(document, list):
        return [without_durations(value) for value in document]
    if isinstance(document, str):
        return DURATION.sub("<duration>", document)
    return document


def test_rule_copy_differs_from_the_shipped_rules_only_in_durations(tmp_path: Path) -> None:
    config = write_prometheus_config(
        tmp_path,
        exporter_port=free_port(),
        alertmanager_port=free_port(),
        prometheus_port=free_port(),
    )
    copied_patterns = yaml.safe_load(config.read_text(encoding="utf-8"))["rule_files"]
    copied = [Path(path) for path in copied_patterns]
    shipped_dir = SHIPPED_PROMETHEUS.parent
    shipped_patterns = yaml.safe_load(SHIPPED_PROMETHEUS.read_text(encoding="utf-8"))["rule_files"]
    shipped = sorted(path for pattern in shipped_patterns for path in shipped_dir.glob(pattern))

    assert [path.name for path in copied] == [path.name for path in shipped]
    for copy_path, shipped_path in zip(copied, shipped, strict=True):
        copy_rules = yaml.safe_load(copy_path.read_text(encoding="utf-8"))
        shipped_rules = yaml.safe_load(shipped_path.read_text(encoding="utf-8"))
        assert copy_rules != shipped_rules
        assert without_durations(copy_rules) == without_durations(shipped_rules)


def test_alertmanager_copy_keeps_the_shipped_routes_inhibitions_and_receivers(
    tmp_path: Path,
) -> None:
    config = write_alertmanager_config(tmp_path, sink_url=f"http://{HOST}:{free_port()}")
    copied = yaml.safe_load(config.read_text(encoding="utf-8"))
    shipped = yaml.safe_load(SHIPPED_ALERTMANAGER.read_text(encoding="utf-8"))

    assert copied["inhibit_rules"] == shipped["inhibit_rules"]
    assert without_durations(copied["route"]) == without_durations(shipped["route"])
    assert [r["name"] for r in copied["receivers"]] == [r["name"] for r in shipped["receivers"]]


# --- The whole path: fake API, exporter, Prometheus, Alertmanager, sink -------------------


@dataclass(frozen=True, slots=True)
class Stack:
    api: FakeStatsApi
    exporter: ExporterProcess
    prometheus: ServiceProcess
    alertmanager: ServiceProcess
    sink: WebhookSink

    @property
    def instance(self) -> str:
        return f"{HOST}:{self.exporter.port}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_tool("prometheus")
    require_tool("prometheus-alertmanager")
    with FakeStatsApi(enabled()) as api, WebhookSink() as sink:
        exporter_args = ["--api.url", api.url, "--api.timeout", "1s"]
        (tmp_path / "exporter").mkdir()
        with (
            running_exporter(exporter_args, tmp_path / "exporter") as exporter,
            running_alertmanager(
                write_alertmanager_config(tmp_path / "alertmanager", sink_url=sink.url),
                tmp_path / "alertmanager",
            ) as alertmanager,
        ):
            prometheus_port = free_port()
            config = write_prometheus_config(
                tmp_path / "prometheus",
                exporter_port=exporter.port,
                alertmanager_port=alertmanager.port,
                prometheus_port=prometheus_port,
            )
            with running_prometheus(config, tmp_path / "prometheus", prometheus_port) as prom:
                yield Stack(api, exporter, prom, alertmanager, sink)
        assert "Traceback" not in exporter.stderr()
    assert api.handler_errors == []
    assert sink.errors == []


def test_new_failures_notify_their_queue_and_stay_inhibited_while_the_api_is_down(
    stack: Stack,
) -> None:
    instance = stack.instance
    # Sums of positive steps need two samples of a series: wait for them before the burst.
    poll(
        lambda: {
            s["metric"]["queue"]
            for s in prometheus_query(stack.prometheus.port, "queue:jobstats_failed_jobs:new10m")
        },
        lambda queues: queues == {"inventory", "product"},
        PATIENCE,
        "Prometheus to record new failed jobs of both queues",
    )

    stack.api.answer(enabled(failed_on_inventory=9))

    notification, alert = stack.sink.wait_for_alert(
        "JobStatsQueueFailedJobs", PATIENCE, queue="inventory"
    )
    assert labels_match(alert, severity="warning", instance=instance, job="jobstats")
    assert notification.payload["receiver"] == "oncall-webhook"
    assert notification.payload["groupLabels"] == {"instance": instance, "queue": "inventory"}
    description = alert["annotations"]["description"]
    assert re.search(r"\b6 new failed jobs\b", description), description
    assert "inventory" in description
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}#jobstatsqueuefailedjobs"
    # On a healthy system nothing else fires, and Prometheus evaluates both queues together:
    # a product alert would be pending or firing by now.
    active = [
        (a["labels"]["alertname"], a["labels"].get("queue"))
        for a in prometheus_alerts(stack.prometheus.port)
    ]
    assert active == [("JobStatsQueueFailedJobs", "inventory")]
    # The same notification, through the shipped templates, on the warning route's Slack.
    [slack] = poll(
        lambda: [
            m.payload["attachments"][0]
            for m in stack.sink.slack_messages()
            if "queue inventory: JobStatsQueueFailedJobs" in m.payload["attachments"][0]["title"]
        ],
        bool,
        PATIENCE,
        "the Slack message of inventory's failed jobs",
    )
    assert description in slack["text"]
    # The link resolves as it is: the exporter Prometheus scraped serves the section.
    runbook = f"http://{instance}/{RUNBOOKS}#jobstatsqueuefailedjobs"
    assert runbook in slack["text"]
    status, page = stack.exporter.get(f"/{RUNBOOKS}")
    assert (status, b'id="jobstatsqueuefailedjobs"' in page) == (200, True)
    assert f"{DASHBOARD}?var-queue=inventory" in slack["text"]

    stack.api.answer(Answer(status=503, body=b'{"success": false, "error": "maintenance"}'))

    notification, api_down = stack.sink.wait_for_alert("JobStatsApiDown", PATIENCE)
    assert labels_match(api_down, severity="critical", instance=instance, job="jobstats")
    assert notification.payload["receiver"] == "oncall-webhook"
    held = poll(
        lambda: alertmanager_alerts(stack.alertmanager.port),
        lambda alerts: any(
            labels_match(a, alertname="JobStatsQueueFailedJobs", queue="inventory")
            and a["status"]["state"] == "suppressed"
            for a in alerts
        ),
        PATIENCE,
        "Alertmanager to hold inventory's JobStatsQueueFailedJobs suppressed",
    )
    [failed] = [a for a in held if labels_match(a, alertname="JobStatsQueueFailedJobs")]
    [api_down_held] = [a for a in held if labels_match(a, alertname="JobStatsApiDown")]
    assert failed["status"]["inhibitedBy"] == [api_down_held["fingerprint"]]
    assert api_down_held["status"]["state"] == "active"
    # The failures are still in the rule's window: the alert fires on, muted, not resolved.
    firing = prometheus_query(
        stack.prometheus.port,
        'ALERTS{alertname="JobStatsQueueFailedJobs", alertstate="firing", queue="inventory"}',
    )
    assert len(firing) == 1, firing
    assert stack.sink.find_alert("JobStatsQueueFailedJobs", queue="product") is None


# --- Inhibition and grouping of the shipped config, with synthetic alerts ------------------


@pytest.fixture(scope="module")
def sink() -> Iterator[WebhookSink]:
    with WebhookSink() as receiver:
        yield receiver
    assert receiver.errors == []


@pytest.fixture(scope="module")
def alertmanager(
    sink: WebhookSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One Alertmanager for the module; each test uses its own `instance` values."""
    require_tool("prometheus-alertmanager")
    directory = tmp_path_factory.mktemp("alertmanager")
    config = write_alertmanager_config(directory, sink_url=sink.url)
    with running_alertmanager(config, directory) as process:
        yield process


def synthetic(
    alertname: str, instance: str, queue: str | None = None, source: str | None = None
) -> dict[str, Any]:
    """An alert as Prometheus would send it from the shipped rules, firing for 10 minutes."""
    labels = {"alertname": alertname, "instance": instance, "job": "jobstats"}
    labels["severity"] = SEVERITY[alertname]
    if queue is not None:
        labels["queue"] = queue
    if source is not None:
        labels["source"] = source
    now = datetime.now(UTC)
    return {
        "labels": labels,
        "annotations": {"summary": f"synthetic {alertname}", "description": "synthetic"},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
        "generatorURL": f"http://{HOST}/synthetic",
    }


#: (alertname, instance key, queue[, source]): instance keys become names unique to each
#: test; `source` is the failed-job alerts' count source, events or retained.
Ref = tuple[str, str, str | None] | tuple[str, str, str | None, str]


@dataclass(frozen=True, slots=True)
class Inhibition:
    source: Ref
    muted: tuple[Ref, ...]
    kept: tuple[Ref, ...]


INHIBITIONS = {
    "exporter_down_mutes_its_instance": Inhibition(
        source=("JobStatsExporterDown", "x", None),
        muted=(
            ("JobStatsQueueFailedJobs", "x", "q"),
            ("JobStatsApiDown", "x", None),
            ("JobStatsRedisUnavailable", "x", None),
            ("JobStatsRecurringJobOverdue", "x", "q"),
            ("JobStatsInvalidQueuePayload", "x", None),
            ("JobStatsRedisSourceDown", "x", None),
            ("JobStatsQueueJobsWaitingTooLong", "x", "q"),
            ("JobStatsEventsMissed", "x", "q"),
        ),
        kept=(("JobStatsQueueFailedJobs", "y", "q"), ("JobStatsRedisSourceDown", "y", None)),
    ),
    "api_down_mutes_queue_alerts_and_redis": Inhibition(
        source=("JobStatsApiDown", "x", None),
        muted=(
            ("JobStatsQueueFailedJobs", "x", "q", "retained"),
            ("JobStatsQueueFailureRatioHigh", "x", "q", "retained"),
            ("JobStatsQueueNotActive", "x", "q"),
            ("JobStatsQueueBacklog", "x", "q"),
            ("JobStatsRecurringJobOverdue", "x", "q"),
            ("JobStatsRedisUnavailable", "x", None),
            ("JobStatsInvalidQueuePayload", "x", None),
        ),
        # Not y's RedisUnavailable: it would mute y's queue alert itself.
        kept=(
            ("JobStatsQueueFailedJobs", "y", "q", "retained"),
            ("JobStatsRedisUnavailable", "z", None),
        ),
    ),
    "api_down_keeps_what_bullmq_redis_counts": Inhibition(
        source=("JobStatsApiDown", "x", None),
        muted=(("JobStatsQueueFailedJobs", "x", "q", "retained"),),
        # Counted from BullMQ's Redis, they do not depend on the API: they keep telling.
        kept=(
            ("JobStatsQueueFailedJobs", "x", "r", "events"),
            ("JobStatsQueueFailureRatioHigh", "x", "r", "events"),
            ("JobStatsQueueJobsWaitingTooLong", "x", "q"),
            ("JobStatsRedisSourceDown", "x", None),
        ),
    ),
    "redis_unavailable_mutes_backlog_and_overdue": Inhibition(
        source=("JobStatsRedisUnavailable", "x", None),
        muted=(
            ("JobStatsQueueBacklog", "x", "q"),
            ("JobStatsRecurringJobOverdue", "x", "q"),
            ("JobStatsQueueFailedJobs", "x", "q"),
            ("JobStatsRedisSourceDown", "x", None),
        ),
        kept=(
            ("JobStatsQueueBacklog", "y", "q"),
            ("JobStatsRecurringJobOverdue", "y", "q"),
            ("JobStatsInvalidQueuePayload", "x", None),
        ),
    ),
    "queue_not_active_mutes_its_queue_only": Inhibition(
        source=("JobStatsQueueNotActive", "x", "q"),
        muted=(("JobStatsRecurringJobOverdue", "x", "q"), ("JobStatsQueueBacklog", "x", "q")),
        kept=(
            ("JobStatsRecurringJobOverdue", "x", "r"),
            ("JobStatsQueueBacklog", "x", "r"),
            ("JobStatsQueueFailedJobs", "x", "q"),
        ),
    ),
}


@pytest.mark.parametrize("case", INHIBITIONS.values(), ids=INHIBITIONS.keys())
def test_inhibition_of_the_shipped_config(
    alertmanager: ServiceProcess, request: pytest.FixtureRequest, case: Inhibition
) -> None:
    test_id = request.node.callspec.id

    def find(alerts: list[dict[str, Any]], ref: Ref) -> dict[str, Any] | None:
        alertname, key, queue, *source = ref
        wanted = {"alertname": alertname, "instance": f"{test_id}-{key}:9787"}
        found = [
            a
            for a in alerts
            if labels_match(a, **wanted)
            and a["labels"].get("queue") == queue
            and a["labels"].get("source") == (source[0] if source else None)
        ]
        assert len(found) <= 1, found
        return found[0] if found else None

    def all_muted(alerts: list[dict[str, Any]]) -> bool:
        source = find(alerts, case.source)
        return source is not None and all(
            (target := find(alerts, ref)) is not None
            and target["status"]["state"] == "suppressed"
            and source["fingerprint"] in target["status"]["inhibitedBy"]
            for ref in case.muted
        )

    refs = (case.source, *case.muted, *case.kept)
    post_alerts(
        alertmanager.port,
        [
            synthetic(name, f"{test_id}-{key}:9787", queue, *source)
            for name, key, queue, *source in refs
        ],
    )

    alerts = poll(
        lambda: alertmanager_alerts(alertmanager.port),
        all_muted,
        PATIENCE,
        f"{case.source} to mute {case.muted}",
    )

    # The source muted its targets, so it has been taken into account for the others too.
    for ref in (case.source, *case.kept):
        alert = find(alerts, ref)
        assert alert is not None, ref
        assert alert["status"] == {"state": "active", "silencedBy": [], "inhibitedBy": []}, ref


def group_notifications(sink: WebhookSink, instance: str) -> list[dict[str, Any]]:
    return [
        n.payload
        for n in sink.notifications()
        if n.payload["groupLabels"].get("instance") == instance
    ]


def test_one_queues_different_alerts_arrive_in_one_notification(
    alertmanager: ServiceProcess, sink: WebhookSink
) -> None:
    instance = "one-queue:9787"
    post_alerts(
        alertmanager.port,
        [
            synthetic("JobStatsQueueFailedJobs", instance, "inventory"),
            synthetic("JobStatsQueueBacklog", instance, "inventory"),
        ],
    )

    [payload] = poll(
        lambda: group_notifications(sink, instance),
        bool,
        PATIENCE,
        f"a notification for {instance}",
    )

    assert payload["groupLabels"] == {"instance": instance, "queue": "inventory"}
    assert payload["receiver"] == "oncall-webhook"
    assert sorted(a["labels"]["alertname"] for a in payload["alerts"]) == [
        "JobStatsQueueBacklog",
        "JobStatsQueueFailedJobs",
    ]


def test_one_queues_critical_and_warning_alerts_arrive_in_one_webhook_notification(
    alertmanager: ServiceProcess, sink: WebhookSink
) -> None:
    instance = "mixed-severities:9787"
    post_alerts(
        alertmanager.port,
        [
            synthetic("JobStatsRecurringJobOverdue", instance, "inventory"),
            synthetic("JobStatsQueueFailedJobs", instance, "inventory"),
        ],
    )

    [payload] = poll(
        lambda: group_notifications(sink, instance),
        bool,
        PATIENCE,
        f"a notification for {instance}",
    )

    assert payload["receiver"] == "oncall-webhook"
    assert sorted(
        (a["labels"]["alertname"], a["labels"]["severity"]) for a in payload["alerts"]
    ) == [("JobStatsQueueFailedJobs", "warning"), ("JobStatsRecurringJobOverdue", "critical")]


def test_two_queues_alerts_arrive_in_separate_notifications(
    alertmanager: ServiceProcess, sink: WebhookSink
) -> None:
    instance = "two-queues:9787"
    post_alerts(
        alertmanager.port,
        [
            synthetic("JobStatsQueueFailedJobs", instance, "inventory"),
            synthetic("JobStatsQueueFailedJobs", instance, "product"),
        ],
    )

    payloads = poll(
        lambda: group_notifications(sink, instance),
        lambda payloads: (
            {a["labels"]["queue"] for p in payloads for a in p["alerts"]}
            == {"inventory", "product"}
        ),
        PATIENCE,
        f"notifications for both queues of {instance}",
    )

    assert sorted(p["groupLabels"]["queue"] for p in payloads) == ["inventory", "product"]
    for payload in payloads:
        assert payload["groupLabels"] == {
            "instance": instance,
            "queue": payload["groupLabels"]["queue"],
        }
        assert [a["labels"]["queue"] for a in payload["alerts"]] == [
            payload["groupLabels"]["queue"]
        ]
