"""Policies decide whether a validated plan runs on its own, is announced, waits for a person, or never runs.

`policy.py` is the policy file (defaults per risk, ordered rules, time
windows, approvers); `limits.py` the limits that keep automation from doing
too much, too often (flap guard, mutation budget, max-unhealthy).
"""

from policies.limits import Limits
from policies.policy import Action, Decision, Policies, PolicyError, Rule, load_policies, may_approve
from policies.windows import Window

__all__ = ["Action", "Decision", "Limits", "Policies", "PolicyError", "Rule", "Window", "load_policies", "may_approve"]
