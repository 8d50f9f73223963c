"""Rollback that waits for a person: a failed plan's undo, stored as a plan of its own awaiting approval.

When a step fails after earlier steps succeeded and the plan's policy says
`rollback: approve`, the steps that undo those (the inverses their tools
recorded before they ran, newest first) become a new plan, planner
`rollback:<failed plan id>`, stored to wait for approval like any plan
(`setpoint approve` / `reject`, the HTTP API, the hooks). Approved, it runs
and is journalled like any plan; since it puts the resource back as it was,
not as desired, its success leaves the resource `Failed`, saying it was
rolled back, and the resource is planned forward again at the next change
or resync. Rejected or expired, the resource is held `Blocked` like any
rejected plan, until its desired value changes or `setpoint replan`.
(`auto` rollback runs in the executor, inside the failed plan.)
"""

from __future__ import annotations

from plans import ExecutionPlan, Observed, PlanRecord, PlanValidationError, Snapshot
from reconciler.approvals import Approvals
from reconciler.cache import DesiredEntry
from tools import ToolRegistry

PLANNER = "rollback"  # a rollback plan's planner is "rollback:<plan id>"


def is_rollback(plan: ExecutionPlan) -> bool:
    return plan.planner.startswith(f"{PLANNER}:")


def undo_plan(failed: PlanRecord) -> tuple[ExecutionPlan | None, str]:
    """The plan that undoes what `failed` did before its failed step, or None and why there is none."""
    undo, why = failed.undo_steps()
    if why:
        return None, f"not rolled back: {why}"
    if not undo:
        return None, "nothing to roll back"
    steps = ", ".join(str(index + 1) for index, _ in undo)
    return ExecutionPlan(
        agent=failed.plan.agent, resource=failed.plan.resource, steps=tuple(step for _, step in undo),
        reasoning=f"undo step{'s' if len(undo) > 1 else ''} {steps} of plan {failed.plan.id}, which failed: "
        f"{failed.message}",
        desired_revision=failed.plan.desired_revision, planner=f"{PLANNER}:{failed.plan.id}",
    ), ""  # fmt: skip


class Rollbacks:
    def __init__(self, *, tools: ToolRegistry, approvals: Approvals) -> None:
        self._tools = tools
        self._approvals = approvals

    async def request(self, entry: DesiredEntry, failed: PlanRecord, observed: Observed | None) -> str:
        """Store the plan that undoes `failed` (as `observed` after it), awaiting approval; what became of it."""
        plan, why = undo_plan(failed)
        if plan is None:
            return why
        assert entry.resource is not None
        try:
            plan, _ = self._tools.validate_plan(plan)
        except PlanValidationError as e:
            return f"not rolled back: {e}"
        record = PlanRecord.start(
            plan, decision="approve", decision_rule="rollback",
            decision_reason=f"the policy says rollback: approve for a {failed.plan.risk} plan",
            approvers=failed.approvers,
        )  # fmt: skip
        snapshot = Snapshot(desired=entry.resource, revision=entry.mod_revision, actual=observed)
        planned = "; ".join(step.description or step.tool for step in plan.steps)
        await self._approvals.request(
            entry, snapshot, record, f"plan {failed.plan.id} failed; its rollback awaits approval: {planned}"
        )
        return f"rollback awaits approval as plan {plan.id}"
