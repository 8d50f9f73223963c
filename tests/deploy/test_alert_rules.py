"""deploy/prometheus/: the alert rules as Prometheus reads them (`promtool check rules`), their unit tests
(`promtool test rules`), and what every alert must carry (severity, summary, description, a runbook section).

promtool comes with Debian's `prometheus` package; without it the promtool tests skip, unless
SETPOINT_REQUIRE_SERVERS=1 (CI), where a missing tool is a failure.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yaml"))
README = ROOT / "README.md"

# The contract (issue 8): these alerts at least, in group `setpoint`.
REQUIRED = {
    "SetpointDown",
    "SetpointWatchStalled",
    "SetpointReconcileErrorsHigh",
    "SetpointResourceNotConverged",
    "SetpointApprovalPending",
    "SetpointFlapGuardTripped",
    "SetpointHealingPaused",
}


def promtool_run(promtool: str, *args: str) -> None:
    result = subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}",
                    pytrace=False)  # fmt: skip


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules(promtool: str) -> None:
    promtool_run(promtool, "check", "rules", str(RULES.relative_to(ROOT)))


def test_the_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS, "no rule tests in deploy/prometheus/tests/"
    promtool_run(promtool, "test", "rules", *(str(p.relative_to(ROOT)) for p in RULE_TESTS))


def test_the_group_holds_the_contracted_alerts() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert [g["name"] for g in groups] == ["setpoint"]
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "an alert name is used twice"
    assert set(names) >= REQUIRED


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_each_alert_says_how_bad_what_and_where_to_read_on(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == f"README.md#runbook-{rule['alert'].lower()}"


def github_anchors(markdown: str) -> set[str]:
    """The anchors a reader can link to: explicit `<a id="...">` and GitHub's slugs of headings."""
    anchors = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_each_runbook_url_names_a_section_of_the_readme() -> None:
    anchors = github_anchors(README.read_text())
    missing = [r["alert"] for r in alert_rules() if r["annotations"]["runbook_url"].split("#", 1)[1] not in anchors]
    assert not missing, f"README.md has no runbook section for {missing}"


def test_each_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never seen firing in deploy/prometheus/tests/"
    assert names - quiet == set(), "alerts never seen staying quiet in deploy/prometheus/tests/"
