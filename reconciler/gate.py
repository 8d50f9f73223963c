"""The gate: may this plan run now, and if not, why not and when to look again.

`Gate.check` takes the plan an agent made and returns a `Verdict`. It writes
nothing and waits for nothing, so every reason a plan is held back is decided
here, in this order:

1. validation: every step against its tool's parameter model, and the plan
   must be for the resource and revision it was asked for (`INVALID_PLAN`);
2. nothing to do (`EMPTY`);
3. size: a plan whose record could outgrow one etcd request never starts,
   since nothing may run that cannot be journalled (`TOO_LARGE`);
4. shadow mode (`shadow.py`): a plan of an agent, kind or planner in shadow
   is `SHADOW`, with the record to store and what the policy would decide;
5. policy (`policies/policy.py`): `DENIED`, or `NEEDS_APPROVAL` with the
   record to store while a person decides; a plan already approved passes
   an `approve` decision, never a `deny`;
6. limits: the flap guard (`FLAP_GUARD`), the max-unhealthy pause for a plan
   that heals drift from a value the resource had converged to, or heals a
   reported issue (`HEALING_PAUSED`; the resources that drifted are those
   that need healing: an issue may stay open long after its heal), and the
   mutation budget (`BUDGET`: the plan has not
   started, so its worker is freed until a slot is);
7. otherwise `RUN`, with the validated steps and a new plan record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from agents import Agent
from plans import ExecutionPlan, PlanRecord, PlanValidationError, ResourceKey, RiskLevel, Snapshot
from policies import Action, Decision, Policies
from policies.limits import FlapGuard, MutationBudget, healing_paused
from reconciler.cache import Cache
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.shadow import SHADOW, ShadowMode
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
    SHADOW = "shadow"


@dataclass(frozen=True, slots=True)
class Verdict:
    check: Check
    plan: ExecutionPlan
    message: str = ""
    retry_after: float | None = None  # when to look again at a plan held back by a limit
    steps: tuple[ValidatedStep, ...] = ()
    record: PlanRecord | None = None  # for RUN: the record to journal; for NEEDS_APPROVAL: the one to store
    decision: Decision | None = None  # the policy's, once it was asked


class Gate:
    def __init__(
        self,
        *,
        tools: ToolRegistry,
        policies: Policies,
        flap: FlapGuard,
        budget: MutationBudget,
        observer: Observer,
        cache: Cache,
        metrics: Metrics,
        shadow: ShadowMode | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`shadow`: which plans are recorded and never run (none by default)."""
        self._tools = tools
        self.policies = policies  # replaced as a whole when the policy file is reloaded
        self._flap = flap
        self._budget = budget
        self._observer = observer
        self._cache = cache
        self._metrics = metrics
        self.shadow = shadow or ShadowMode()
        self._now = now

    def check(
        self,
        plan: ExecutionPlan,
        *,
        key: ResourceKey,
        revision: int,
        heals_drift: bool,
        labels: Mapping[str, str],
        approved: bool = False,
    ) -> Verdict:
        """The verdict on `plan`, made for `key` (with `labels`) at desired `revision`; `heals_drift` when it
        restores a value the resource had already converged to (not a new desired value, not a removal);
        `approved` when a person approved this very plan."""
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
        decision = self.decide(plan, labels)
        shadowed = self.shadow.reason(plan)
        if not approved and shadowed is None:  # a plan in shadow is counted once, when it is recorded
            self._metrics.plans.labels(risk=plan.risk.value, decision=decision.action.value).inc()
        record = PlanRecord.start(
            plan, decision=decision.action.value if shadowed is None else SHADOW, decision_rule=decision.rule,
            decision_reason=decision.reason if shadowed is None else
            f"shadow mode ({shadowed}); the policy would have decided {decision.action.value}: {decision.reason}",
            approvers=list(decision.approvers),
        )  # fmt: skip
        record.rollback = decision.rollback
        size = record.worst_case_bytes()
        if size > MAX_RECORD_BYTES:
            return Verdict(
                Check.TOO_LARGE, plan,
                f"the plan for this value cannot be journalled: its record could grow to {size} bytes, more than "
                f"etcd accepts in one request ({MAX_RECORD_BYTES}); make the value smaller",
            )  # fmt: skip
        planned = "; ".join(s.description for s in plan.steps)
        if shadowed is not None:  # recorded with what the policy would have decided; no limit is charged
            message = f"shadow mode ({shadowed}): {planned}"
            return Verdict(Check.SHADOW, plan, message, steps=tuple(steps), record=record, decision=decision)
        if decision.action is Action.DENY:
            message = f"plan not run: denied by policy ({decision.reason}); planned: {planned}"
            return Verdict(Check.DENIED, plan, message, decision=decision)
        if decision.action is Action.APPROVE and not approved:
            message = f"awaiting approval ({decision.reason}): {planned}"
            return Verdict(Check.NEEDS_APPROVAL, plan, message, steps=tuple(steps), record=record, decision=decision)
        held = self._limited(plan, key, heals_drift=heals_drift)
        if held is not None:
            return held
        return Verdict(Check.RUN, plan, plan.reasoning, steps=tuple(steps), record=record, decision=decision)

    def decide(self, plan: ExecutionPlan, labels: Mapping[str, str]) -> Decision:
        """What the policies in force say about `plan`, now."""
        return self.policies.evaluate(plan, labels=labels, now=self._now())

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
                max_fraction=self.policies.limits.max_unhealthy_fraction,
                min_count=self.policies.limits.max_unhealthy_min_count,
            )
            if reason is not None:
                self._metrics.healing_paused.labels(kind=key.kind).inc()
                return Verdict(Check.HEALING_PAUSED, plan, reason, retry_after=HEALING_RECHECK_SECONDS)
        wait = self._budget.wait_time()
        if wait > 0 and plan.risk > RiskLevel.READ_ONLY:
            return Verdict(Check.BUDGET, plan, "waiting for the mutating-steps-per-minute budget", retry_after=wait)
        return None


async def plan_and_check(agent: Agent, gate: Gate, snapshot: Snapshot, *, heals_drift: bool) -> Verdict:
    """From a snapshot to a gated plan: the one path the daemon and `setpoint plan` share."""
    plan = await (agent.retire(snapshot) if snapshot.deleted else agent.reconcile(snapshot))
    return gate.check(
        plan, key=snapshot.key, revision=snapshot.revision, heals_drift=heals_drift, labels=snapshot.desired.labels
    )
