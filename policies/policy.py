"""The policy file: what runs on its own, what is announced, what waits for a person, what never runs.

    defaults: {read_only: auto, low: auto, medium: notify, high: approve, critical: deny}
    llm_defaults: {read_only: auto, low: auto, medium: approve, high: approve, critical: deny}
    approvers: []                 # who may approve by default; empty: anyone who can write approvals/
    rules:                        # the first rule that matches decides; else the default for the risk
      - name: no-deletes-in-office-hours
        match:
          kind: file
          name: "prod-*"          # globs
          labels: {tier: "prod"}
          tools: [file.delete]    # any step's tool
          risk: [high, critical]
          planner: "llm:*"        # "rules" or "llm:<tier>:<provider>/<model>"
          window: {days: mon-fri, hours: "09:00-17:00", timezone: Europe/Berlin}
        action: approve           # auto | notify | approve | deny
        approvers: [alice, bob]
    rollback: {read_only: auto, low: auto, medium: auto, high: never, critical: never}
    limits: {flap_max_plans: 6, ...}

`rollback` says what a plan of each risk does when one of its steps fails
after earlier ones succeeded: `auto` undoes those steps at once, newest
first, with the inverse each tool recorded before it ran; `approve` stores
that undo as a plan of its own, waiting for a person; `never` leaves things
as the failure left them. A rule may say `rollback:` for the plans it
matches.

For a plan a language model made (`planner: llm:...`), when no rule
matches, the stricter of `defaults` and `llm_defaults` decides: out of the
box, such a plan above `low` waits for a person. `notify` runs like `auto` and is announced through the approval hooks.
Every part of a match must hold for the rule to match; a part left out
matches anything. An empty plan is never evaluated: there is nothing to
decide. The decision names the rule that made it (`defaults.<risk>` when
no rule matched), and that is stored in the plan record.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plans import ExecutionPlan, RiskLevel, RollbackMode
from plans.yamldoc import YamlError, load_document
from policies.limits import Limits
from policies.windows import Window


class Action(StrEnum):
    AUTO = "auto"
    NOTIFY = "notify"
    APPROVE = "approve"
    DENY = "deny"

    @property
    def runs_now(self) -> bool:
        return self in (Action.AUTO, Action.NOTIFY)


_STRICTNESS = {Action.AUTO: 0, Action.NOTIFY: 1, Action.APPROVE: 2, Action.DENY: 3}


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, the line and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Match(_Strict):
    kind: list[str] = Field(default_factory=list, description="Kind globs; any may match.")
    name: list[str] = Field(default_factory=list, description="Resource name globs; any may match.")
    labels: dict[str, str] = Field(default_factory=dict, description="Label globs; all must match.")
    tools: list[str] = Field(default_factory=list, description="Tool globs; matches when any step uses one.")
    risk: list[RiskLevel] = Field(default_factory=list, description="Plan risk levels; any may match.")
    planner: list[str] = Field(default_factory=list, description="Planner globs: rules, llm:*, ...")
    window: Window | None = Field(default=None, description="Only inside this time window.")

    @field_validator("kind", "name", "tools", "risk", "planner", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value  # `kind: file` means `kind: [file]`

    def matches(self, plan: ExecutionPlan, labels: Mapping[str, str], now: datetime) -> bool:
        return (
            _any_glob(self.kind, [plan.resource.kind])
            and _any_glob(self.name, [plan.resource.name])
            and all(k in labels and fnmatch.fnmatchcase(labels[k], v) for k, v in self.labels.items())
            and _any_glob(self.tools, [step.tool for step in plan.steps])
            and (not self.risk or plan.risk in self.risk)
            and _any_glob(self.planner, [plan.planner])
            and (self.window is None or self.window.contains(now))
        )


def _any_glob(patterns: list[str], values: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(v, p) for p in patterns for v in values)


class Rule(_Strict):
    name: str = Field(min_length=1, max_length=100)
    match: Match = Field(default_factory=Match)
    action: Action
    approvers: list[str] | None = Field(
        default=None, description="Who may approve plans this rule sends for approval; default: the file's approvers."
    )
    rollback: RollbackMode | None = Field(
        default=None, description="auto | approve | never, when a step fails after others succeeded; default: "
        "the file's rollback for the plan's risk.",
    )  # fmt: skip


class Defaults(_Strict):
    read_only: Action = Action.AUTO
    low: Action = Action.AUTO
    medium: Action = Action.NOTIFY
    high: Action = Action.APPROVE
    critical: Action = Action.DENY

    def for_risk(self, risk: RiskLevel) -> Action:
        action: Action = getattr(self, risk.value)
        return action


class RollbackDefaults(_Strict):
    """What a plan of each risk does when a step fails after earlier steps succeeded."""

    read_only: RollbackMode = RollbackMode.AUTO
    low: RollbackMode = RollbackMode.AUTO
    medium: RollbackMode = RollbackMode.AUTO
    high: RollbackMode = RollbackMode.NEVER
    critical: RollbackMode = RollbackMode.NEVER

    def for_risk(self, risk: RiskLevel) -> RollbackMode:
        mode: RollbackMode = getattr(self, risk.value)
        return mode


class ModelDefaults(Defaults):
    """What each risk level does, when no rule matches, for a plan a language model made."""

    medium: Action = Action.APPROVE


class Decision(_Strict):
    action: Action
    rule: str = Field(description="The rule that decided, or defaults.<risk>.")
    reason: str
    approvers: tuple[str, ...] = Field(default=(), description="Who may approve; empty: anyone.")
    rollback: RollbackMode = Field(default=RollbackMode.NEVER, description="What to do if a later step fails.")


class Policies(_Strict):
    defaults: Defaults = Field(default_factory=Defaults)
    llm_defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    rollback: RollbackDefaults = Field(default_factory=RollbackDefaults)
    approvers: list[str] = Field(default_factory=list, description="Who may approve; empty: anyone.")
    rules: list[Rule] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)

    @model_validator(mode="after")
    def _unique_names(self) -> Policies:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; rule names must be unique")
            seen.add(rule.name)
        return self

    def evaluate(self, plan: ExecutionPlan, *, labels: Mapping[str, str], now: datetime) -> Decision:
        """The decision on `plan` for a resource with `labels` at the aware time `now`."""
        for rule in self.rules:
            if rule.match.matches(plan, labels, now):
                return Decision(
                    action=rule.action, rule=rule.name,
                    reason=f"rule {rule.name!r} matched (risk {plan.risk})",
                    approvers=tuple(rule.approvers if rule.approvers is not None else self.approvers),
                    rollback=rule.rollback or self.rollback.for_risk(plan.risk),
                )  # fmt: skip
        action = self.defaults.for_risk(plan.risk)
        if plan.planner.startswith("llm:"):  # the stricter of the two: llm_defaults may not loosen defaults
            model_action = self.llm_defaults.for_risk(plan.risk)
            if _STRICTNESS[model_action] >= _STRICTNESS[action]:
                return Decision(
                    action=model_action, rule=f"llm_defaults.{plan.risk}",
                    reason=f"risk {plan.risk} from a language model: {model_action} by default",
                    approvers=tuple(self.approvers), rollback=self.rollback.for_risk(plan.risk),
                )  # fmt: skip
        return Decision(
            action=action, rule=f"defaults.{plan.risk}", reason=f"risk {plan.risk}: {action} by default",
            approvers=tuple(self.approvers), rollback=self.rollback.for_risk(plan.risk),
        )  # fmt: skip

    def unknown_tools(self, known: Collection[str]) -> list[tuple[int, str]]:
        """(rule index, pattern) for each tool pattern that matches no tool in `known`: a typo."""
        return [
            (index, pattern)
            for index, rule in enumerate(self.rules)
            for pattern in rule.match.tools
            if not any(fnmatch.fnmatchcase(tool, pattern) for tool in known)
        ]


def may_approve(decision_approvers: Collection[str], by: str) -> bool:
    """Whether `by` may approve a plan whose decision names `decision_approvers` (globs; empty: anyone)."""
    return not decision_approvers or any(fnmatch.fnmatchcase(by, p) for p in decision_approvers)


def load_policies(path: str | Path | None, *, known_tools: Collection[str] | None = None) -> Policies:
    """The policies in `path` (the built-in defaults when None); PolicyError naming file, line and field."""
    if path is None:
        return Policies()
    try:
        document = load_document(path, what="policy file")
    except YamlError as e:
        raise PolicyError(str(e)) from None
    if not isinstance(document.data, dict):
        raise PolicyError(f"{document.name} must hold a mapping at the top level")
    try:
        policies = Policies.model_validate(document.data)
    except ValidationError as e:
        reason = document.describe(e, what=None, whole="(top level)", unknown="is not a known policy field")
        raise PolicyError(reason) from None
    if known_tools is not None:
        for index, pattern in policies.unknown_tools(known_tools):
            where = document.where(("rules", index, "match", "tools"))
            raise PolicyError(
                f"{where}: rules.{index}.match.tools: {pattern!r} matches no tool "
                f"(known: {', '.join(sorted(known_tools))})"
            )
    return policies
