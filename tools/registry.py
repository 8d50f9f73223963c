"""The tool registry and plan validation.

Validation is all-or-nothing: `validate_plan` checks every step before the
executor runs the first one, so a plan with a bad fifth step never runs its
first four.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from plans import ExecutionPlan, PlanValidationError, RiskLevel, Step
from plans.errors import describe_validation_error
from plans.risk import max_risk
from tools.base import Tool


@dataclass(frozen=True, slots=True)
class ValidatedStep:
    """A step bound to its tool, with parameters parsed by the tool's model and its effective risk."""

    index: int
    step: Step
    tool: Tool
    params: BaseModel
    risk: RiskLevel


class ToolRegistry:
    """Tools by name, assembled explicitly at start-up."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise PlanValidationError(f"unknown tool {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def validate_step(self, step: Step, *, index: int = 0) -> ValidatedStep:
        """Bind `step` to its tool and parse its parameters; raise PlanValidationError naming the step."""
        try:
            tool = self.get(step.tool)
        except PlanValidationError as e:
            raise PlanValidationError(f"step {index + 1}: {e}") from None
        try:
            params = tool.parameters.model_validate(step.parameters, strict=True)
        except ValidationError as e:
            reason = describe_validation_error(e, what="parameter", whole="(parameters)", every=True)
            raise PlanValidationError(f"step {index + 1} ({step.tool}): {reason}") from None
        return ValidatedStep(
            index=index, step=step, tool=tool, params=params, risk=max_risk(tool.risk, step.risk)
        )

    def validate_plan(self, plan: ExecutionPlan) -> tuple[ExecutionPlan, list[ValidatedStep]]:
        """Validate every step; return the plan with each step's risk raised to its effective risk."""
        validated = [self.validate_step(step, index=i) for i, step in enumerate(plan.steps)]
        steps = tuple(
            v.step if v.step.risk == v.risk else v.step.model_copy(update={"risk": v.risk}) for v in validated
        )
        if steps != plan.steps:
            plan = plan.model_copy(update={"steps": steps})
            validated = [
                ValidatedStep(index=v.index, step=s, tool=v.tool, params=v.params, risk=v.risk)
                for v, s in zip(validated, steps, strict=True)
            ]
        return plan, validated
