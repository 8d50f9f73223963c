"""The gate: may this plan run now, and if not, why not and when to look again.

`Gate.check` takes the plan an agent made and returns a `Verdict`. It writes
nothing and waits for nothing, so every reason a plan is held back is decided
here, in this order:

1. validation: every step against its tool's parameter model, and the plan
   must be for the resource and revision it was asked for (`INVALID_PLAN`);
2. nothing to do (`EMPTY`);
3. policy: `DENIED`, or `NEEDS_APPROVAL` (approvals plug in here);
4. size: a plan whose record could outgrow one etcd request never starts,
   since nothing may run that cannot be journalled (`TOO_LARGE`);
5. limits: the flap guard (`FLAP_GUARD`), the max-unhealthy pause for a plan
   that heals drift from a value the resource had converged to
   (`HEALING_PAUSED`), and the mutation budget (`BUDGET`: the plan has not
   started, so its worker is freed until a slot is);
6. otherwise `RUN`, with the validated steps and a new plan record.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from plans import ExecutionPlan, PlanRecord, PlanValidationError, ResourceKey, RiskLevel
from policies import Action, PolicySet
from policies.limits import FlapGuard, MutationBudget, healing_paused
from reconciler.cache import Cache
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.settings import LimitsSettings
from reconciler.store import MAX_REQUEST_BYTES
from tools import ToolRegistry, ValidatedStep

HEALING_RECHECK_SECONDS = 30.0
MAX_RECORD_BYTES = MAX_REQUEST_BYTES - 16 * 1024  # room for the key and the transaction around it


class Check(StrEnum):
    RUN = "run"
    EMPTY = "empty"
    INVALID_PLAN = "invalid_plan"
    DENIED = "denied"
    NEEDS_APPROVAL = "needs_approval"
    TOO_LARGE = "too_large"
    FLAP_GUARD = "flap_guard"
    HEALING_PAUSED = "healing_paused"
    BUDGET = "budget"


@dataclass(frozen=True, slots=True)
class Verdict:
    check: Check
    plan: ExecutionPlan
    message: str = ""
    retry_after: float | None = None  # when to look again at a plan held back by a limit
    steps: tuple[ValidatedStep, ...] = ()
    record: PlanRecord | None = None  # for RUN: the record to journal


class Gate:
    def __init__(
        self,
        *,
        tools: ToolRegistry,
        policies: PolicySet,
        flap: FlapGuard,
        budget: MutationBudget,
        observer: Observer,
        cache: Cache,
        limits: LimitsSettings,
        metrics: Metrics,
    ) -> None:
        self._tools = tools
        self._policies = policies
        self._flap = flap
        self._budget = budget
        self._observer = observer
        self._cache = cache
        self._limits = limits
        self._metrics = metrics

    def check(self, plan: ExecutionPlan, *, key: ResourceKey, revision: int, heals_drift: bool) -> Verdict:
        """The verdict on `plan`, made for `key` at desired `revision`; `heals_drift` when it restores a
        value the resource had already converged to (not a new desired value, not a removal)."""
        if plan.resource != key or plan.desired_revision != revision:
            return Verdict(
                Check.INVALID_PLAN, plan,
                f"agent {plan.agent} made a plan for {plan.resource} at revision {plan.desired_revision}, "
                f"but was asked for {key} at revision {revision}",
            )  # fmt: skip
        try:
            plan, steps = self._tools.validate_plan(plan)
        except PlanValidationError as e:
            return Verdict(Check.INVALID_PLAN, plan, f"agent {plan.agent} made an invalid plan: {e}")
        if plan.is_empty:
            return Verdict(Check.EMPTY, plan, plan.reasoning)
        decision = self._policies.evaluate(plan)
        self._metrics.plans.labels(decision=decision.action.value).inc()
        if decision.action is not Action.AUTO:
            return self._refused(plan, decision.action, decision.reason)
        record = PlanRecord.start(plan, decision=decision.action.value, decision_reason=decision.reason)
        size = record.worst_case_bytes()
        if size > MAX_RECORD_BYTES:
            return Verdict(
                Check.TOO_LARGE, plan,
                f"the plan for this value cannot be journalled: its record could grow to {size} bytes, more than "
                f"etcd accepts in one request ({MAX_RECORD_BYTES}); make the value smaller",
            )  # fmt: skip
        held = self._limited(plan, key, heals_drift=heals_drift)
        if held is not None:
            return held
        return Verdict(Check.RUN, plan, plan.reasoning, steps=tuple(steps), record=record)

    def _refused(self, plan: ExecutionPlan, action: Action, reason: str) -> Verdict:
        why = "denied by policy" if action is Action.DENY else "needs approval"
        message = (
            f"plan not run: {why} ({reason}); "
            + ("approvals are not available in this version; " if action is Action.APPROVE else "")
            + f"planned: {'; '.join(s.description for s in plan.steps)}"
        )
        return Verdict(Check.DENIED if action is Action.DENY else Check.NEEDS_APPROVAL, plan, message)

    def _limited(self, plan: ExecutionPlan, key: ResourceKey, *, heals_drift: bool) -> Verdict | None:
        wait = self._flap.blocked_for(key)
        if wait is not None:
            self._metrics.flap_guard_blocked.labels(kind=key.kind).inc()
            return Verdict(Check.FLAP_GUARD, plan, self._flap.reason(key), retry_after=wait + 0.1)
        if heals_drift:
            healing = self._observer.drifted(key.kind) | {key}
            total = sum(1 for e in self._cache.desired.values() if e.key.kind == key.kind and e.valid and not e.deleted)
            reason = healing_paused(
                kind=key.kind,
                unhealthy=len(healing),
                total=total,
                max_fraction=self._limits.max_unhealthy_fraction,
                min_count=self._limits.max_unhealthy_min_count,
            )
            if reason is not None:
                self._metrics.healing_paused.labels(kind=key.kind).inc()
                return Verdict(Check.HEALING_PAUSED, plan, reason, retry_after=HEALING_RECHECK_SECONDS)
        wait = self._budget.wait_time()
        if wait > 0 and plan.risk > RiskLevel.READ_ONLY:
            return Verdict(Check.BUDGET, plan, "waiting for the mutating-steps-per-minute budget", retry_after=wait)
        return None
