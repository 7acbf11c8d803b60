"""Generate the Kubernetes manifests that copy another file of the repository.

prometheusrule.yaml carries the groups of alerts/*.rules.yml and
grafana-dashboard.yaml the JSON of grafana/dashboards/, so each has one
source of truth. `python deploy/kubernetes/build_manifests.py` rewrites
them; `--check` only compares and exits 1 on any difference (the tests do).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MANIFESTS", "dashboard_configmap", "main", "prometheus_rule"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RULE_FILES = sorted((ROOT / "alerts").glob("*.rules.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
LABELS = {"app.kubernetes.io/name": "jobstats-exporter"}


def header(*sources: Path) -> str:
    names = ", ".join(str(source.relative_to(ROOT)) for source in sources)
    return (
        f"# Generated from {names} by deploy/kubernetes/build_manifests.py: edit those and\n"
        "# run `make generate`, never this file.\n"
    )


def prometheus_rule() -> str:
    """A PrometheusRule holding every group of the rule files, unchanged."""
    groups: list[Any] = []
    for path in RULE_FILES:
        groups.extend(yaml.safe_load(path.read_text(encoding="utf-8"))["groups"])
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "jobstats-exporter",
            # kube-prometheus-stack's default ruleSelector; change it to match yours.
            "labels": {**LABELS, "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return header(*RULE_FILES) + _dump(manifest)


def dashboard_configmap() -> str:
    """A ConfigMap that Grafana's dashboard sidecar loads (label grafana_dashboard: "1")."""
    manifest = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "jobstats-dashboards",
            "labels": {**LABELS, "grafana_dashboard": "1"},
        },
        "data": {path.name: path.read_text(encoding="utf-8") for path in DASHBOARDS},
    }
    return header(*DASHBOARDS) + _dump(manifest)


MANIFESTS: dict[str, Callable[[], str]] = {
    "prometheusrule.yaml": prometheus_rule,
    "grafana-dashboard.yaml": dashboard_configmap,
}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, JSON) as literal blocks, as a person would write them."""


def _literal(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _literal)


def _dump(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for name, build in MANIFESTS.items():
        path = HERE / name
        wanted = build()
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != wanted:
                stale.append(name)
        else:
            path.write_text(wanted, encoding="utf-8")
    if stale:
        print(f"out of date: {', '.join(stale)}; run make generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
