"""The policy file: defaults per risk, ordered rules (first match wins), time windows under a fixed clock,
and errors that name the file, the line and the field."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from plans import ExecutionPlan, ResourceKey, RiskLevel, Step
from policies import Action, Policies, PolicyError, Window, load_policies, may_approve

MONDAY_NOON_BERLIN = datetime(2026, 11, 23, 11, 0, tzinfo=UTC)  # 12:00 in Berlin (CET)
SATURDAY = datetime(2026, 11, 28, 11, 0, tzinfo=UTC)
EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "policies.example.yaml"


def plan_of(
    *risks: RiskLevel, kind: str = "file", name: str = "motd", tools: tuple[str, ...] = (), planner: str = "rules"
) -> ExecutionPlan:
    names = tools or tuple(f"tool{i}" for i in range(len(risks)))
    steps = tuple(Step(tool=t, risk=r) for t, r in zip(names, risks, strict=True))
    return ExecutionPlan(
        agent="file", resource=ResourceKey(kind=kind, name=name), steps=steps, desired_revision=1, planner=planner
    )


@pytest.mark.parametrize(
    ("risk", "action"),
    [
        (RiskLevel.READ_ONLY, Action.AUTO),
        (RiskLevel.LOW, Action.AUTO),
        (RiskLevel.MEDIUM, Action.NOTIFY),
        (RiskLevel.HIGH, Action.APPROVE),
        (RiskLevel.CRITICAL, Action.DENY),
    ],
)
def test_out_of_the_box_each_risk_has_its_default(risk: RiskLevel, action: Action) -> None:
    decision = Policies().evaluate(plan_of(risk), labels={}, now=MONDAY_NOON_BERLIN)

    assert decision.action is action
    assert decision.rule == f"defaults.{risk}"


RULES: dict[str, Any] = {
    "rules": [
        {"name": "no-ssh", "match": {"name": "ssh-*"}, "action": "deny"},
        {"name": "prod", "match": {"labels": {"env": "prod*"}, "risk": ["low", "medium"]}, "action": "approve"},
        {"name": "deletes", "match": {"tools": "file.del*"}, "action": "notify"},
        {"name": "llm", "match": {"planner": "llm:*"}, "action": "approve", "approvers": ["alice"]},
        {"name": "other-kinds", "match": {"kind": ["process", "http_*"]}, "action": "deny"},
    ],
    "approvers": ["oncall-*"],
}


@pytest.mark.parametrize(
    ("plan", "labels", "action", "rule"),
    [
        (plan_of(RiskLevel.LOW, name="ssh-config"), {}, Action.DENY, "no-ssh"),
        (plan_of(RiskLevel.LOW), {"env": "production"}, Action.APPROVE, "prod"),
        (plan_of(RiskLevel.HIGH), {"env": "production"}, Action.APPROVE, "defaults.high"),  # risk not matched
        (plan_of(RiskLevel.LOW), {"env": "staging"}, Action.AUTO, "defaults.low"),
        (plan_of(RiskLevel.LOW), {}, Action.AUTO, "defaults.low"),  # a label that is absent does not match
        (plan_of(RiskLevel.LOW, RiskLevel.HIGH, tools=("file.write", "file.delete")), {}, Action.NOTIFY, "deletes"),
        (plan_of(RiskLevel.LOW, planner="llm:large:anthropic/x"), {}, Action.APPROVE, "llm"),
        (plan_of(RiskLevel.LOW, kind="http_check"), {}, Action.DENY, "other-kinds"),
        (plan_of(RiskLevel.LOW, name="ssh-x", planner="llm:small:o/y"), {}, Action.DENY, "no-ssh"),  # first wins
    ],
)
def test_the_first_matching_rule_decides(
    plan: ExecutionPlan, labels: dict[str, str], action: Action, rule: str
) -> None:
    decision = Policies.model_validate(RULES).evaluate(plan, labels=labels, now=MONDAY_NOON_BERLIN)

    assert (decision.action, decision.rule) == (action, rule)


def test_approvers_come_from_the_rule_else_the_file() -> None:
    policies = Policies.model_validate(RULES)

    by_rule = policies.evaluate(plan_of(RiskLevel.LOW, planner="llm:x"), labels={}, now=SATURDAY)
    by_file = policies.evaluate(plan_of(RiskLevel.HIGH), labels={}, now=SATURDAY)

    assert by_rule.approvers == ("alice",) and by_file.approvers == ("oncall-*",)
    assert may_approve(by_file.approvers, "oncall-bob") and not may_approve(by_file.approvers, "mallory")
    assert may_approve((), "anyone")


OFFICE_HOURS = {
    "rules": [
        {
            "name": "office-hours",
            "match": {"window": {"days": "mon-fri", "hours": "09:00-17:00", "timezone": "Europe/Berlin"}},
            "action": "approve",
        }
    ]
}


@pytest.mark.parametrize(
    ("now", "action"),
    [
        (MONDAY_NOON_BERLIN, Action.APPROVE),
        (datetime(2026, 11, 23, 8, 0, tzinfo=UTC), Action.APPROVE),  # 09:00 Berlin: the start is inclusive
        (datetime(2026, 11, 23, 7, 59, tzinfo=UTC), Action.AUTO),  # 08:59 Berlin
        (SATURDAY, Action.AUTO),
        (datetime(2026, 11, 23, 16, 0, tzinfo=UTC), Action.AUTO),  # 17:00 Berlin: the end is exclusive
        (datetime(2026, 7, 6, 14, 59, tzinfo=UTC), Action.APPROVE),  # 16:59 Berlin in summer time (UTC+2)
        (datetime(2026, 7, 6, 15, 0, tzinfo=UTC), Action.AUTO),  # 17:00 Berlin in summer time
    ],
)
def test_a_time_window_is_in_its_own_time_zone(now: datetime, action: Action) -> None:
    decision = Policies.model_validate(OFFICE_HOURS).evaluate(plan_of(RiskLevel.LOW), labels={}, now=now)

    assert decision.action is action, now


@pytest.mark.parametrize(
    ("window", "now", "inside"),
    [
        (Window(days="fri", hours="22:00-06:00"), datetime(2026, 11, 27, 23, 0, tzinfo=UTC), True),  # Fri 23:00
        (Window(days="fri", hours="22:00-06:00"), datetime(2026, 11, 28, 5, 59, tzinfo=UTC), True),  # Sat 05:59
        (Window(days="fri", hours="22:00-06:00"), datetime(2026, 11, 28, 23, 0, tzinfo=UTC), False),  # Sat 23:00
        (Window(days="fri", hours="22:00-06:00"), datetime(2026, 11, 27, 5, 0, tzinfo=UTC), False),  # Fri 05:00
        (Window(days="sat,sun"), SATURDAY, True),
        (Window(days="sat-mon"), MONDAY_NOON_BERLIN, True),  # a range may wrap the week
        (Window(days="tue-thu"), MONDAY_NOON_BERLIN, False),
        (Window(hours="00:00-24:00"), datetime(2026, 11, 23, 23, 59, tzinfo=UTC), True),
    ],
)
def test_windows_cross_midnight_and_wrap_the_week(window: Window, now: datetime, inside: bool) -> None:
    assert window.contains(now) is inside


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("defaults:\n  high: yes-please\n", "line 2: defaults.high: Input should be 'auto', 'notify', 'approve'"),
        ("rules:\n  - name: a\n    action: auto\n    match:\n      risk: huge\n", "line 5: rules.0.match.risk.0"),
        ("rules:\n  - name: a\n    action: auto\n    match: {window: {days: weekdays}}\n",
         "line 4: rules.0.match.window.days: 'weekdays' is not a day or a range of days"),
        ("rules:\n  - name: a\n    action: auto\n    match: {window: {timezone: Mars/Olympus}}\n",
         "'Mars/Olympus' is not a known time zone"),
        ("rules:\n  - name: a\n    action: auto\n    match: {window: {hours: '9-17'}}\n",
         "'9' is not a time of day such as 09:00"),
        ("rules:\n  - name: a\n    action: auto\n  - name: a\n    action: deny\n", "two rules are named 'a'"),
        ("rules:\n  - name: a\n    action: auto\n    matches: {}\n", "line 4: rules.0.matches is not a known policy"),
        ("limits: {flap_max_plans: 0}\n", "line 1: limits.flap_max_plans"),
        ("rules: [\n", "line 2 column 1: not valid YAML"),
        ("- a\n", "must hold a mapping"),
    ],
)
def test_mistakes_name_the_file_the_line_and_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(PolicyError) as raised:
        load_policies(path)

    assert str(raised.value).startswith(f"policy file {path}"), raised.value
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_rule_naming_a_tool_no_agent_has_is_a_typo(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - name: a\n    action: deny\n    match: {tools: [file.delte]}\n")

    with pytest.raises(PolicyError, match=r"line 4: rules.0.match.tools: 'file.delte' matches no tool"):
        load_policies(path, known_tools=["file.write", "file.delete"])
    load_policies(write(tmp_path, "rules: [{name: a, action: deny, match: {tools: 'file.*'}}]\n"),
                  known_tools=["file.write"])  # fmt: skip


def test_a_missing_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^cannot read policy file .*absent.yaml: No such file"):
        load_policies(tmp_path / "absent.yaml")


def test_the_example_policy_file_is_valid() -> None:
    policies = load_policies(EXAMPLE, known_tools=["file.write", "file.delete", "file.read"])

    assert [rule.name for rule in policies.rules] == ["never-touch-ssh", "prod-office-hours", "announce-llm-plans"]
    assert policies.defaults == Policies().defaults


@pytest.mark.parametrize(
    ("risk", "policy", "action", "rule"),
    [
        (RiskLevel.LOW, {}, Action.AUTO, "llm_defaults.low"),
        (RiskLevel.MEDIUM, {}, Action.APPROVE, "llm_defaults.medium"),  # rules' medium is only notify
        (RiskLevel.CRITICAL, {}, Action.DENY, "llm_defaults.critical"),
        (RiskLevel.LOW, {"defaults": {"low": "approve"}}, Action.APPROVE, "defaults.low"),  # never looser
        (RiskLevel.MEDIUM, {"llm_defaults": {"medium": "auto"}}, Action.NOTIFY, "defaults.medium"),
        (RiskLevel.HIGH, {"llm_defaults": {"high": "deny"}}, Action.DENY, "llm_defaults.high"),
    ],
)
def test_a_models_plan_gets_the_stricter_of_defaults_and_llm_defaults(
    risk: RiskLevel, policy: dict[str, Any], action: Action, rule: str
) -> None:
    policies = Policies.model_validate(policy)
    decision = policies.evaluate(plan_of(risk, planner="llm:small:openai/m"), labels={}, now=SATURDAY)
    assert (decision.action, decision.rule) == (action, rule)
    rules_plan = policies.evaluate(plan_of(risk), labels={}, now=SATURDAY)
    assert rules_plan.rule == f"defaults.{risk}"
