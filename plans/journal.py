"""The plan record stored under `plans/<id>`: the plan, its policy decision and a per-step journal.

Each step is journalled before it runs (`running`, with a start time) and
after (`succeeded` / `failed`, with a finish time and message), so after a
crash the record says exactly which steps completed and which one was cut off.

A record must always fit in one etcd request, whatever its tools return: a
step's output is cut to `MAX_OUTPUT_BYTES` (and says so), and a plan is
accepted only if its record, grown by the most each of its steps can add,
still fits (`PlanRecord.worst_case_bytes`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue

from plans.model import ExecutionPlan, Step

MAX_OUTPUT_BYTES = 4096  # of one step's output, as JSON
MAX_MESSAGE_CHARS = 500  # of one step's message
MAX_UNDO_BYTES = 8192  # of one step's inverse, as JSON: a larger one is not kept, and that step cannot be undone
_PREVIEW_CHARS = 1024
# What one step's journal entry can add to a record: its output and message at
# their caps (a character may take 6 bytes as a JSON escape), times and state.
STEP_GROWTH_BYTES = MAX_OUTPUT_BYTES + 6 * MAX_MESSAGE_CHARS + 256


def utcnow() -> datetime:
    return datetime.now(UTC)


def cap_output(output: dict[str, JsonValue]) -> tuple[dict[str, JsonValue], str]:
    """`output` if its JSON fits in MAX_OUTPUT_BYTES, else a stand-in with its size and a preview,
    and a note saying it was cut ("" when it was not)."""
    text = json.dumps(output, ensure_ascii=False)
    size = len(text.encode("utf-8"))
    if size <= MAX_OUTPUT_BYTES:
        return output, ""
    note = f"output cut: {size} bytes, more than the {MAX_OUTPUT_BYTES} the journal keeps"
    return {"truncated": True, "bytes": size, "preview": text[:_PREVIEW_CHARS]}, note


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class PlanState(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"  # stored, waiting for a person's decision
    REJECTED = "rejected"  # a person said no: nothing ran
    EXPIRED = "expired"  # nobody decided within approvals.plan_ttl_seconds: nothing ran
    VOIDED = "voided"  # the desired value or the actual state moved on before a decision: nothing ran
    PENDING = "pending"
    EXECUTING = "executing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BLOCKED = "blocked"
    INTERRUPTED = "interrupted"
    SUPERSEDED = "superseded"
    SHADOW = "shadow"  # made and gated in shadow mode: recorded, never executed


class ApprovalNote(BaseModel):
    """A decision taken on a plan (`approval`), or one refused (`refusals`), with who, when and why."""

    model_config = ConfigDict(extra="forbid")

    decision: str
    by: str
    reason: str = ""
    at: AwareDatetime
    source: str = ""
    refused: str = Field(default="", description="Why this decision was not accepted; empty when it was.")


class IssueRef(BaseModel):
    """An issue report a plan answers: the issue's id, which report of it, and what it said."""

    model_config = ConfigDict(extra="forbid")

    id: str
    report: str
    summary: str = ""


class StepRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    tool: str
    state: StepState = StepState.PENDING
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    message: str = ""
    output: dict[str, JsonValue] = Field(default_factory=dict)
    undo: Step | None = Field(default=None, description="The step that undoes this one, recorded before it ran.")
    undo_note: str = Field(default="", description="Why no inverse was kept, when one could not be.")


class RollbackStep(StepRecord):
    """A step run to undo step `undoes` (0-based) of the plan after a later step failed."""

    step: Step
    undoes: int


class RollbackMode(StrEnum):
    AUTO = "auto"  # undo at once what the plan did before the step that failed
    APPROVE = "approve"  # the undo waits for a person: a plan of its own, awaiting approval
    NEVER = "never"  # leave it as it is


class PlanRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: ExecutionPlan
    plan_hash: str
    decision: str
    decision_reason: str = ""
    decision_rule: str = ""
    approvers: list[str] = Field(default_factory=list, description="Who may approve; empty: anyone.")
    retiring: bool = Field(default=False, description="The plan tears down a deleted resource.")
    observed_fingerprint: str | None = Field(
        default=None, description="sha256 of the observation the plan was made from; a plan awaiting approval "
        "is voided when the resource no longer looks like this.",
    )  # fmt: skip
    expires_at: AwareDatetime | None = Field(default=None, description="When a plan awaiting approval expires.")
    approval: ApprovalNote | None = None
    refusals: list[ApprovalNote] = Field(default_factory=list)
    answers: list[IssueRef] = Field(
        default_factory=list, description="The issue reports this plan answers (a heal, or a drift repair made "
        "while they were open)."
    )  # fmt: skip
    state: PlanState = PlanState.PENDING
    rollback: RollbackMode = Field(
        default=RollbackMode.NEVER, description="What the policy said to do if a step fails after others succeeded."
    )
    steps: list[StepRecord]
    rolled_back: list[RollbackStep] = Field(default_factory=list, description="The rollback's steps, journalled.")
    created_at: AwareDatetime = Field(default_factory=utcnow)
    updated_at: AwareDatetime = Field(default_factory=utcnow)
    message: str = ""
    verification: str = Field(
        default="", description="What was seen after the last step: whether the resource matched desired."
    )
    outcome_unknown_step: int | None = Field(
        default=None,
        description="1-based step whose effect is unknown after a crash; the resource is held until desired changes.",
    )

    def worst_case_bytes(self) -> int:
        """The size this record can grow to as its steps are journalled, and the inverses it keeps are run."""
        rollback = sum(len(s.undo.model_dump_json()) + STEP_GROWTH_BYTES for s in self.steps if s.undo is not None)
        return len(self.model_dump_json()) + STEP_GROWTH_BYTES * len(self.steps) + rollback

    @property
    def began(self) -> bool:
        """Whether a step was journalled started: the plan's first write was made."""
        return any(step.started_at is not None for step in self.steps)

    def undo_steps(self) -> tuple[list[tuple[int, Step]], str]:
        """What undoes the steps that succeeded before the one that failed, newest first, as (index, inverse);
        or, when one of them kept no inverse, nothing and why it cannot be undone."""
        failed = next((s.index for s in self.steps if s.state is StepState.FAILED), len(self.steps))
        done = [s for s in self.steps[:failed] if s.state is StepState.SUCCEEDED]
        for s in done:
            if s.undo is None and s.undo_note:
                return [], f"step {s.index + 1} ({s.tool}) cannot be undone: {s.undo_note}"
        return [(s.index, s.undo) for s in reversed(done) if s.undo is not None], ""

    @property
    def all_succeeded(self) -> bool:
        return all(step.state is StepState.SUCCEEDED for step in self.steps)

    @classmethod
    def start(
        cls,
        plan: ExecutionPlan,
        *,
        decision: str,
        decision_reason: str = "",
        decision_rule: str = "",
        approvers: list[str] | None = None,
    ) -> PlanRecord:
        return cls(
            plan=plan,
            plan_hash=plan.content_hash(),
            decision=decision,
            decision_reason=decision_reason,
            decision_rule=decision_rule,
            approvers=approvers or [],
            steps=[StepRecord(index=i, tool=step.tool) for i, step in enumerate(plan.steps)],
        )
