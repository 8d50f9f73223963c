"""The shared vocabulary of setpoint: risk, resources, steps, plans and their journal.

Every other package builds on these models and this package imports nothing of
ours, so the models stay small, frozen and serialisable: a plan written to etcd
and read back is equal to the one that was written.
"""

from plans.approval import Approval, ApprovalDecision
from plans.errors import (
    GaveUp,
    InvalidResourceError,
    PermanentError,
    PlanningFailed,
    PlanningUnavailable,
    PlanValidationError,
    SetpointError,
    TemporaryError,
)
from plans.journal import (
    ApprovalNote,
    IssueRef,
    PlanRecord,
    PlanState,
    RollbackMode,
    RollbackStep,
    StepRecord,
    StepState,
)
from plans.model import ExecutionPlan, Step, new_plan_id
from plans.resources import (
    NAME_PATTERN,
    Issue,
    Observed,
    Resource,
    ResourceKey,
    validate_name,
)
from plans.risk import RiskLevel
from plans.snapshot import Snapshot

__all__ = [
    "NAME_PATTERN",
    "Approval",
    "ApprovalDecision",
    "ApprovalNote",
    "ExecutionPlan",
    "GaveUp",
    "InvalidResourceError",
    "Issue",
    "IssueRef",
    "Observed",
    "PermanentError",
    "PlanRecord",
    "PlanState",
    "PlanValidationError",
    "PlanningFailed",
    "PlanningUnavailable",
    "Resource",
    "ResourceKey",
    "RiskLevel",
    "RollbackMode",
    "RollbackStep",
    "SetpointError",
    "Snapshot",
    "Step",
    "StepRecord",
    "StepState",
    "TemporaryError",
    "new_plan_id",
    "validate_name",
]
