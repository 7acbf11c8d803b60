"""Alerting: the shipped Prometheus config, alert rules and Alertmanager config.

Debian's real promtool and amtool check them, run the rules' unit tests in
alerts/tests/, route alerts and render the notification templates. Nothing here
starts a server, listens or connects anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.runbooks import read_runbooks, to_html

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = Path("prometheus/prometheus.yml")
RULES = Path("alerts/jobstats.rules.yml")
RULE_TESTS = Path("alerts/tests/jobstats.rules.test.yml")
ALERTMANAGER_CONFIG = Path("alerts/alertmanager.yml")
TEMPLATES_GLOB = "alerts/templates/*.tmpl"
RUNBOOKS = Path("exporter/runbooks.md")

SEVERITIES = frozenset({"critical", "warning", "info"})
ANNOTATIONS = frozenset({"summary", "description", "runbook_url"})
#: No alert may fire on a single bad scrape or a pause shorter than a minute.
MIN_FOR_SECONDS = 60
#: Alertmanager keys that would hold a secret in the file itself; each has a `_file` twin.
INLINE_SECRET_KEYS = frozenset(
    {
        "api_url",
        "slack_api_url",
        "auth_password",
        "smtp_auth_password",
        "auth_secret",
        "smtp_auth_secret",
        "password",
        "credentials",
        "bearer_token",
        "service_key",
        "routing_key",
        "api_key",
        "api_secret",
        "token",
        "bot_token",
    }
)
TEMPLATE_NAMES = ("jobstats.text", "jobstats.title", "jobstats.email.html")
#: The page the exporter serves them at, relative to the base address of the notifications.
RUNBOOKS_PAGE = "runbooks"
#: The rules' runbook_url: the exporter's page, relative to the one base address the template
#: `jobstats.runbook_base_url` defines (by default, the alert's own exporter).
FAILED_JOBS_RUNBOOK = f"{RUNBOOKS_PAGE}#jobstatsqueuefailedjobs"
INSTANCE = "exporter:9787"
RUNBOOK_BASE_DEFINITION = (
    '{{ define "jobstats.runbook_base_url" }}'
    '{{ if match ":" .Labels.instance }}http://{{ .Labels.instance }}/{{ end }}{{ end }}'
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rules file, in order (an alert name may have several)."""
    return [
        rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


ALERT_RULES = alert_rules()
ALERT_NAMES = sorted({rule["alert"] for rule in ALERT_RULES})
RULE_IDS = [
    f"{rule['alert']}-{rule.get('labels', {}).get('severity', 'no-severity')}"
    for rule in ALERT_RULES
]


def debian_tool(name: str) -> str:
    """The path of a binary from Debian's prometheus or prometheus-alertmanager package.

    When it is missing the test is skipped, unless JOBSTATS_REQUIRE_TOOLS is set (as in
    CI): then the test fails.
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("JOBSTATS_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is required (JOBSTATS_REQUIRE_TOOLS is set) but not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture
def promtool() -> str:
    return debian_tool("promtool")


@pytest.fixture
def amtool() -> str:
    return debian_tool("amtool")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root, as the README's commands do."""
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit status {result.returncode}\n{result.stdout}\n{result.stderr}"


def duration_seconds(duration: str) -> float:
    """A Prometheus duration (`1m`, `1h30m`, `500ms`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, (
        f"not a Prometheus duration: {duration!r}"
    )
    return sum(int(number) * units[unit] for number, unit in parts)


def jobstats_scrape_interval_seconds() -> float:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "jobstats"]
    interval = job.get("scrape_interval", config.get("global", {}).get("scrape_interval", "1m"))
    return duration_seconds(interval)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown document.

    Lowercase, punctuation dropped, spaces turned into '-'; a repeated heading gets
    '-1', '-2', ... Lines inside fenced code blocks are not headings.
    """
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        heading = re.match(r" {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if fenced or heading is None:
            continue
        anchor = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


def mapping_keys(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every (path, key) of a parsed YAML document, nested mappings and lists included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, str(key)
            yield from mapping_keys(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from mapping_keys(item, f"{path}[{index}]")


# Prometheus and the rules, through promtool.


def test_prometheus_config_passes_promtool_check_config(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))

    assert result.returncode == 0, report(result)


def test_prometheus_config_loads_the_shipped_rules() -> None:
    config_dir = ROOT / PROMETHEUS_CONFIG.parent
    loaded = {
        path.resolve()
        for pattern in load_yaml(PROMETHEUS_CONFIG)["rule_files"]
        for path in config_dir.glob(pattern)
    }

    assert (ROOT / RULES).resolve() in loaded


def test_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))

    assert result.returncode == 0, report(result)


def test_alert_rules_pass_their_promtool_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULE_TESTS))

    assert result.returncode == 0, report(result)


def test_unit_tests_run_against_the_shipped_rules() -> None:
    tests_dir = ROOT / RULE_TESTS.parent

    rule_files = {(tests_dir / path).resolve() for path in load_yaml(RULE_TESTS)["rule_files"]}

    assert rule_files == {(ROOT / RULES).resolve()}


@pytest.mark.parametrize("alertname", ALERT_NAMES)
def test_every_alert_has_a_firing_and_a_silent_unit_test(alertname: str) -> None:
    """A silent case counts only once the alert's `for:` could have elapsed."""
    longest_for = max(
        duration_seconds(rule.get("for", "0s"))
        for rule in ALERT_RULES
        if rule["alert"] == alertname
    )
    cases = [
        case
        for group in load_yaml(RULE_TESTS)["tests"]
        for case in group.get("alert_rule_test") or []
        if case["alertname"] == alertname
    ]
    firing = [alert for case in cases for alert in case.get("exp_alerts") or []]
    silent = [
        case
        for case in cases
        if not case.get("exp_alerts") and duration_seconds(case["eval_time"]) > longest_for
    ]

    assert firing, f"no unit test where {alertname} fires"
    assert silent, f"no unit test where {alertname} stays silent after its `for:`"
    for alert in firing:
        assert alert.get("exp_labels", {}).get("severity") in SEVERITIES, alert
        assert set(alert.get("exp_annotations", {})) == ANNOTATIONS, alert


@pytest.mark.parametrize("rule", ALERT_RULES, ids=RULE_IDS)
def test_alert_has_a_severity_the_annotations_and_a_for_longer_than_a_minute(
    rule: dict[str, Any],
) -> None:
    minimum = max(MIN_FOR_SECONDS, 2 * jobstats_scrape_interval_seconds())

    assert rule["labels"]["severity"] in SEVERITIES
    assert ANNOTATIONS.issubset(rule["annotations"])
    assert all(str(rule["annotations"][name]).strip() for name in ANNOTATIONS)
    assert duration_seconds(rule.get("for", "0s")) >= minimum


@pytest.mark.parametrize("rule", ALERT_RULES, ids=RULE_IDS)
def test_runbook_url_points_to_a_section_of_the_runbooks(rule: dict[str, Any]) -> None:
    """Relative to the base address, so that it names the runbook the exporter serves."""
    page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
    runbooks = ROOT / RUNBOOKS

    assert page == RUNBOOKS_PAGE
    assert runbooks.is_file(), f"{RUNBOOKS} is missing"
    assert anchor in github_anchors(runbooks.read_text(encoding="utf-8"))


# Alertmanager, through amtool.


def test_alertmanager_config_passes_amtool_check_config(amtool: str) -> None:
    result = run(amtool, "check-config", str(ALERTMANAGER_CONFIG))

    assert result.returncode == 0, report(result)


# The webhook takes critical and warning alerts first (`continue`), so that one queue's
# alerts of both severities arrive there together; then each goes to its severity's receiver.
ROUTES = {
    "critical": (["severity=critical"], "oncall-webhook,oncall-critical"),
    "warning": (["severity=warning"], "oncall-webhook,oncall-warning"),
    "info": (["severity=info"], "team-info"),
    "no severity": ([], "oncall-webhook,oncall-warning"),
}


@pytest.mark.parametrize(("severity", "receiver"), ROUTES.values(), ids=ROUTES.keys())
def test_alert_is_routed_by_severity(amtool: str, severity: list[str], receiver: str) -> None:
    labels = ["alertname=JobStatsQueueFailedJobs", "instance=exporter:9787", "queue=inventory"]

    result = run(
        amtool,
        "config",
        "routes",
        "test",
        "--config.file",
        str(ALERTMANAGER_CONFIG),
        f"--verify.receivers={receiver}",
        *labels,
        *severity,
    )

    assert result.returncode == 0, report(result)


def test_alertmanager_reads_every_secret_from_a_file() -> None:
    config = load_yaml(ALERTMANAGER_CONFIG)

    inline = [f"{path}.{key}" for path, key in mapping_keys(config) if key in INLINE_SECRET_KEYS]

    assert inline == []
    assert "slack_api_url_file" in config["global"]
    assert "smtp_auth_password_file" in config["global"]


def test_alertmanager_groups_one_queue_per_notification() -> None:
    route = load_yaml(ALERTMANAGER_CONFIG)["route"]

    assert "queue" in route["group_by"]
    assert "alertname" not in route["group_by"]
    assert "..." not in route["group_by"]
    for child in route.get("routes", []):
        assert child.get("group_by", route["group_by"]) == route["group_by"], child


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_notification_template_renders(amtool: str, template: str) -> None:
    result = run(
        amtool,
        "template",
        "render",
        "--template.glob",
        TEMPLATES_GLOB,
        "--template.text",
        f'{{{{ template "{template}" . }}}}',
    )

    assert result.returncode == 0, report(result)
    assert result.stdout.strip()


def failed_jobs_notification(runbook_url: str, instance: str | None = INSTANCE) -> dict[str, Any]:
    """The data Alertmanager gives a template for one firing JobStatsQueueFailedJobs."""
    labels = {
        "alertname": "JobStatsQueueFailedJobs",
        "severity": "warning",
        "job": "jobstats",
        "queue": "inventory",
    } | ({"instance": instance} if instance is not None else {})
    data = {
        "receiver": "oncall-warning",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {
                    "summary": "Queue inventory has new failed jobs",
                    "description": "5 new failed jobs on queue inventory in the last 10 minutes",
                    "runbook_url": runbook_url,
                },
                "startsAt": "2025-08-14T06:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "",
                "fingerprint": "0",
            }
        ],
        "groupLabels": {"instance": "exporter:9787", "queue": "inventory"},
        "commonLabels": labels,
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
    }
    return data


def render(
    amtool: str, template: str, data: dict[str, Any], tmp_path: Path, glob: str = TEMPLATES_GLOB
) -> subprocess.CompletedProcess[str]:
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(data), encoding="utf-8")
    return run(
        amtool,
        "template",
        "render",
        "--template.glob",
        glob,
        "--template.data",
        str(data_file),
        "--template.text",
        f'{{{{ template "{template}" . }}}}',
    )


@pytest.mark.parametrize("template", ["jobstats.text", "jobstats.email.html"])
def test_notification_names_the_queue_and_links_runbook_and_dashboard(
    amtool: str, template: str, tmp_path: Path
) -> None:
    result = render(amtool, template, failed_jobs_notification(FAILED_JOBS_RUNBOOK), tmp_path)
    link = f"http://{INSTANCE}/{FAILED_JOBS_RUNBOOK}"

    assert result.returncode == 0, report(result)
    assert "queue inventory" in result.stdout or "<b>inventory</b>" in result.stdout
    assert "5 new failed jobs" in result.stdout
    assert f"Runbook: {link}\n" in result.stdout or f'Runbook: <a href="{link}">' in result.stdout
    assert "var-queue=inventory" in result.stdout


def test_runbook_base_address_is_defined_once_and_is_the_alerts_exporter_by_default() -> None:
    templates = "".join(
        path.read_text(encoding="utf-8") for path in sorted(ROOT.glob(TEMPLATES_GLOB))
    )

    assert templates.count('define "jobstats.runbook_base_url"') == 1
    assert RUNBOOK_BASE_DEFINITION in templates


@pytest.mark.parametrize("template", ["jobstats.text", "jobstats.email.html"])
def test_runbook_links_join_the_base_address_set_in_the_template(
    amtool: str, template: str, tmp_path: Path
) -> None:
    """As a deployer does it: one edit of jobstats.runbook_base_url, and every link is whole."""
    base = "https://jobstats.example.com/"
    templates = tmp_path / "templates"
    templates.mkdir()
    for path in ROOT.glob(TEMPLATES_GLOB):
        text = path.read_text(encoding="utf-8").replace(
            RUNBOOK_BASE_DEFINITION,
            f'{{{{ define "jobstats.runbook_base_url" }}}}{base}{{{{ end }}}}',
        )
        (templates / path.name).write_text(text, encoding="utf-8")

    result = render(
        amtool,
        template,
        failed_jobs_notification(FAILED_JOBS_RUNBOOK),
        tmp_path,
        glob=str(templates / "*.tmpl"),
    )

    assert result.returncode == 0, report(result)
    assert f"{base}{FAILED_JOBS_RUNBOOK}" in result.stdout


def test_an_absolute_runbook_url_is_kept_as_it_is(amtool: str, tmp_path: Path) -> None:
    """Rules of the deployer's own may link their runbooks anywhere."""
    absolute = "https://wiki.example.com/runbooks/failed-jobs"

    result = render(amtool, "jobstats.text", failed_jobs_notification(absolute), tmp_path)

    assert result.returncode == 0, report(result)
    assert f"Runbook: {absolute}\n" in result.stdout


def test_every_rules_default_link_is_a_section_of_the_page_its_exporter_serves(
    amtool: str, tmp_path: Path
) -> None:
    """By default each link is http://<instance>/runbooks#<alert>, and that page has the id."""
    notification = failed_jobs_notification(FAILED_JOBS_RUNBOOK)
    (alert,) = notification["alerts"]
    notification["alerts"] = [
        alert
        | {
            "labels": alert["labels"] | {"alertname": rule["alert"]},
            "annotations": alert["annotations"]
            | {"runbook_url": rule["annotations"]["runbook_url"]},
        }
        for rule in ALERT_RULES
    ]
    served_ids = set(re.findall(r' id="([^"]+)"', to_html(read_runbooks())))

    result = render(amtool, "jobstats.text", notification, tmp_path)

    assert result.returncode == 0, report(result)
    links = re.findall(r"^Runbook: (.*)$", result.stdout, flags=re.MULTILINE)
    assert len(links) == len(ALERT_RULES)
    for link in links:
        page, _, anchor = link.partition("#")
        assert page == f"http://{INSTANCE}/{RUNBOOKS_PAGE}"
        assert anchor in served_ids


@pytest.mark.parametrize(
    "instance", [None, "production"], ids=["no instance (absent)", "a /probe target name"]
)
def test_runbook_link_without_an_exporter_address_stays_relative(
    amtool: str, tmp_path: Path, instance: str | None
) -> None:
    """No host:port to link to: the path is shown, never a made-up address."""
    result = render(
        amtool, "jobstats.text", failed_jobs_notification(FAILED_JOBS_RUNBOOK, instance), tmp_path
    )

    assert result.returncode == 0, report(result)
    assert f"Runbook: {FAILED_JOBS_RUNBOOK}\n" in result.stdout
