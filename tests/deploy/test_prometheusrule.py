"""deploy/kubernetes/prometheusrule.yaml: the PrometheusRule carries exactly the groups of
deploy/prometheus/alerts.yaml, and is what `make prometheusrule` writes from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
MANIFEST = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"


def test_the_prometheusrule_holds_the_rule_files_groups() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "setpoint"
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    assert manifest["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}


def test_the_prometheusrule_is_generated_from_the_current_rule_file() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "prometheus" / "prometheusrule.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
