"""Policies decide whether a validated plan runs on its own, waits for a human, or is refused.

This first version has one built-in policy, the risk ceiling: plans up to
`max_auto_risk` run automatically, riskier ones need approval. Policy files,
limits (flap guard, blast radius, max-unhealthy) and approval hooks build on
the `Policy` protocol and `Decision` here.
"""

from policies.decision import Action, Decision, Policy, PolicySet, RiskCeiling

__all__ = ["Action", "Decision", "Policy", "PolicySet", "RiskCeiling"]
