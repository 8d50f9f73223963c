"""How one reconcile ended: a closed set, so `setpoint_reconcile_total{result}` has a fixed label set."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Result(StrEnum):
    CONVERGED = "converged"  # nothing to do, or the plan succeeded
    REMOVED = "removed"  # a deleted resource was torn down (or released) and forgotten
    ABSENT = "absent"  # no desired value and nothing to tear down
    INVALID = "invalid"  # the value cannot be acted on
    BLOCKED = "blocked"  # policy denied the plan, or a person rejected it, or nobody decided in time
    AWAITING_APPROVAL = "awaiting_approval"  # a plan waits for a person's decision
    FLAP_GUARD = "flap_guard"
    HEALING_PAUSED = "healing_paused"
    BUDGET = "budget"  # waiting for the mutating-steps-per-minute budget
    OUTCOME_UNKNOWN = "outcome_unknown"  # a step cut off by a crash cannot be settled: the resource is held
    HELD = "held"  # still held, until its desired value changes
    SUPERSEDED = "superseded"  # the desired value moved on mid-plan
    INTERRUPTED = "interrupted"  # shutdown, or a lost leadership, stopped the plan between steps
    ROLLED_BACK = "rolled_back"  # a rollback plan ran: the resource is as before, not as desired
    SHADOW = "shadow"  # shadow mode: the plan was recorded, not run
    STALE = "stale"  # the cache was behind etcd: nothing was written or run
    RETRY = "retry"  # a temporary error (a failed plan, etcd unavailable)
    TERMINAL = "terminal"  # a permanent error: dropped until the inputs change
    ERROR = "error"  # an unexpected exception


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Result
    requeue_after: float | None = None
