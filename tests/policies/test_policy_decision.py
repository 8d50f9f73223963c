"""RiskCeiling runs plans up to its limit automatically and asks approval above it; in a PolicySet the
strictest decision wins (deny > approve > auto), the first policy breaking a tie."""

from __future__ import annotations

import itertools

import pytest

from plans import ExecutionPlan, ResourceKey, RiskLevel, Step
from policies import Action, Decision, PolicySet, RiskCeiling


def plan_of(risk: RiskLevel | None) -> ExecutionPlan:
    steps = () if risk is None else (Step(tool="file.write", risk=RiskLevel.LOW), Step(tool="x", risk=risk))
    return ExecutionPlan(agent="file", resource=ResourceKey(kind="file", name="motd"), steps=steps, desired_revision=1)


class Always:
    """A policy that always decides `action`."""

    def __init__(self, action: Action, *, name: str) -> None:
        self.action = action
        self.name = name

    def evaluate(self, plan: ExecutionPlan) -> Decision:
        return Decision(action=self.action, reason=f"always {self.action.value}", policy=self.name)


@pytest.mark.parametrize(
    ("risk", "action"),
    [
        (None, Action.AUTO),
        (RiskLevel.READ_ONLY, Action.AUTO),
        (RiskLevel.LOW, Action.AUTO),
        (RiskLevel.MEDIUM, Action.AUTO),
        (RiskLevel.HIGH, Action.APPROVE),
        (RiskLevel.CRITICAL, Action.APPROVE),
    ],
)
def test_risk_ceiling_defaults_to_medium(risk: RiskLevel | None, action: Action) -> None:
    decision = RiskCeiling().evaluate(plan_of(risk))
    assert decision.action is action
    assert decision.policy == "risk-ceiling"


def test_risk_ceiling_names_the_risk_and_the_limit() -> None:
    decision = RiskCeiling(RiskLevel.LOW).evaluate(plan_of(RiskLevel.MEDIUM))
    assert decision.action is Action.APPROVE
    assert decision.reason == "risk medium is above the automatic limit low"


def test_a_read_only_ceiling_lets_only_read_only_plans_run() -> None:
    ceiling = RiskCeiling(RiskLevel.READ_ONLY)
    assert ceiling.evaluate(plan_of(None)).action is Action.AUTO
    assert ceiling.evaluate(plan_of(RiskLevel.LOW)).action is Action.APPROVE


def test_the_strictest_decision_wins_whatever_the_order() -> None:
    policies = [RiskCeiling(RiskLevel.CRITICAL), Always(Action.DENY, name="deny"), Always(Action.APPROVE, name="ok")]
    for order in itertools.permutations(policies):
        assert PolicySet(order).evaluate(plan_of(RiskLevel.LOW)).policy == "deny"


def test_approve_beats_auto() -> None:
    decision = PolicySet([RiskCeiling(), Always(Action.APPROVE, name="ask")]).evaluate(plan_of(RiskLevel.LOW))
    assert (decision.action, decision.policy) == (Action.APPROVE, "ask")


def test_all_auto_runs_automatically() -> None:
    decision = PolicySet([RiskCeiling(), Always(Action.AUTO, name="yes")]).evaluate(plan_of(RiskLevel.LOW))
    assert (decision.action, decision.policy) == (Action.AUTO, "risk-ceiling")


def test_the_first_policy_breaks_a_tie() -> None:
    first, second = Always(Action.APPROVE, name="first"), Always(Action.APPROVE, name="second")
    assert PolicySet([first, second]).evaluate(plan_of(None)).policy == "first"
    assert PolicySet([second, first]).evaluate(plan_of(None)).policy == "second"


def test_a_policy_set_needs_a_policy() -> None:
    with pytest.raises(ValueError):
        PolicySet([])
