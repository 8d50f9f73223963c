"""Policy decisions and the combination rule: the strictest decision wins (deny > approve > auto)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from plans import ExecutionPlan, RiskLevel


class Action(StrEnum):
    AUTO = "auto"
    APPROVE = "approve"
    DENY = "deny"


_STRICTNESS = {Action.AUTO: 0, Action.APPROVE: 1, Action.DENY: 2}


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: Action
    reason: str
    policy: str


class Policy(Protocol):
    name: str

    def evaluate(self, plan: ExecutionPlan) -> Decision: ...


class RiskCeiling:
    """Plans whose risk is at most `max_auto_risk` run automatically; riskier ones need approval."""

    name = "risk-ceiling"

    def __init__(self, max_auto_risk: RiskLevel = RiskLevel.MEDIUM) -> None:
        self.max_auto_risk = max_auto_risk

    def evaluate(self, plan: ExecutionPlan) -> Decision:
        if plan.risk <= self.max_auto_risk:
            return Decision(
                action=Action.AUTO,
                reason=f"risk {plan.risk} is within the automatic limit {self.max_auto_risk}",
                policy=self.name,
            )
        return Decision(
            action=Action.APPROVE,
            reason=f"risk {plan.risk} is above the automatic limit {self.max_auto_risk}",
            policy=self.name,
        )


class PolicySet:
    """Evaluates every policy; the strictest decision wins, the first policy breaking a tie."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        if not policies:
            raise ValueError("a policy set needs at least one policy")
        self._policies = tuple(policies)

    def evaluate(self, plan: ExecutionPlan) -> Decision:
        decisions = [policy.evaluate(plan) for policy in self._policies]
        return max(decisions, key=lambda d: _STRICTNESS[d.action])
