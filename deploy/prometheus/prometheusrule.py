#!/usr/bin/env python3
"""Writes deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yaml.

The PrometheusRule (prometheus-operator) carries the rule file's groups
unchanged: the file below its opening comment is indented under `spec:`, so
comments and block scalars stay as written, and the result is checked by
parsing both. Edit alerts.yaml, then run `make prometheusrule`. With
`--check` nothing is written; the exit status is 1 when the manifest is not
what this script would write (the test suite runs that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
MANIFEST = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/alerts.yaml by `make prometheusrule`: edit that file, not this one.
# A Prometheus picks PrometheusRules by label (its ruleSelector; kube-prometheus-stack wants
# `release: <its release>`): add yours when applying, e.g. with kustomize's `labels`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: setpoint
  labels:
    app.kubernetes.io/name: setpoint
    app.kubernetes.io/component: alerting
spec:
"""


def render(alerts: str) -> str:
    """The manifest for the rule file text `alerts`."""
    lines = alerts.splitlines()
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("#")):
        lines.pop(0)  # the rule file's own introduction, which speaks of loading it as a file
    manifest = HEADER + "".join(f"  {line}\n" if line.strip() else "\n" for line in lines)
    if yaml.safe_load(manifest)["spec"]["groups"] != yaml.safe_load(alerts)["groups"]:
        raise ValueError(f"{ALERTS}: indenting the rule file under spec: changed its groups")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the manifest is stale")
    args = parser.parse_args(argv)
    manifest = render(ALERTS.read_text())
    current = MANIFEST.read_text() if MANIFEST.exists() else None
    if args.check:
        if current != manifest:
            print(f"{MANIFEST.relative_to(ROOT)} is not generated from the current alerts.yaml: "
                  "run `make prometheusrule`", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if current != manifest:
        MANIFEST.write_text(manifest)
        print(f"wrote {MANIFEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
