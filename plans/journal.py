"""The plan record stored under `plans/<id>`: the plan, its policy decision and a per-step journal.

Each step is journalled before it runs (`running`, with a start time) and
after (`succeeded` / `failed`, with a finish time and message), so after a
crash the record says exactly which steps completed and which one was cut off.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plans.model import ExecutionPlan


def utcnow() -> datetime:
    return datetime.now(UTC)


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class PlanState(StrEnum):
    PENDING = "pending"
    EXECUTING = "executing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BLOCKED = "blocked"
    INTERRUPTED = "interrupted"
    SUPERSEDED = "superseded"


class StepRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    tool: str
    state: StepState = StepState.PENDING
    started_at: datetime | None = None
    finished_at: datetime | None = None
    message: str = ""
    output: dict[str, JsonValue] = Field(default_factory=dict)


class PlanRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: ExecutionPlan
    plan_hash: str
    decision: str
    decision_reason: str = ""
    state: PlanState = PlanState.PENDING
    steps: list[StepRecord]
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    message: str = ""
    outcome_unknown_step: int | None = Field(
        default=None,
        description="1-based step whose effect is unknown after a crash; the resource is held until desired changes.",
    )

    @classmethod
    def start(cls, plan: ExecutionPlan, *, decision: str, decision_reason: str = "") -> PlanRecord:
        return cls(
            plan=plan,
            plan_hash=plan.content_hash(),
            decision=decision,
            decision_reason=decision_reason,
            steps=[StepRecord(index=i, tool=step.tool) for i, step in enumerate(plan.steps)],
        )
