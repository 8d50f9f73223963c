"""A person's decision on a plan, as written under `approvals/<plan-id>` by `setpoint approve` or the HTTP API.

The decision is bound to the exact plan: `plan_hash` must be the hash of
the plan awaiting approval, or the daemon refuses it (and records why).
`replan` asks the daemon to drop a plan (awaiting approval, rejected or
expired) and plan the resource afresh.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

MAX_REASON_CHARS = 500


class ApprovalDecision(StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    REPLAN = "replan"


class Approval(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    decision: ApprovalDecision
    plan_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the plan decided on.")
    by: str = Field(min_length=1, max_length=100, description="Who decided.")
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)
    at: AwareDatetime
    source: str = Field(default="", max_length=100, description="How it was given: cli, http.")
