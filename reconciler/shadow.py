"""Shadow mode: plans are made, gated and recorded, never executed.

This is how an operator trials a new agent, a new kind or a new model on
real resources without letting it act: `agents.<name>.mode: shadow` puts an
agent's plans in shadow, `llm.kinds.<kind>.mode: shadow` a model-planned
kind's, and `llm.mode: shadow` every plan a language model makes (the rules
still act). A plan in shadow goes through validation and the policy like any
other (what the policy would have decided is kept in the record), and is
stored under `plans/<id>` with decision `shadow` and state `shadow`; its
steps are `skipped`. No limit is charged (nothing ran), no approval is asked.

The resource's status says `Pending`: it is not at its desired state and
nothing will act on it, with the plan that would have run in the message.
The same plan (same content hash: agent, resource, revision, steps) is
recorded once, not on every resync. `setpoint plans list --shadow` puts each
shadow plan next to what then ran for its resource, and
`setpoint_shadow_plans_total{kind,decision}` counts them by what the policy
would have decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from plans import ExecutionPlan, PlanRecord, PlanState, ResourceKey, StepState
from reconciler.cache import DesiredEntry
from reconciler.journal import PlanJournal
from reconciler.metrics import Metrics
from reconciler.outcome import Outcome, Result
from reconciler.status import Phase, StatusWriter

log = structlog.get_logger("setpoint.shadow")

SHADOW = "shadow"  # the decision a shadow plan is recorded with


@dataclass(frozen=True, slots=True)
class ShadowMode:
    """Which plans are in shadow: by agent name, by resource kind, and whether every model's plan is."""

    agents: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    models: bool = False

    def reason(self, plan: ExecutionPlan) -> str | None:
        """The setting that puts `plan` in shadow, or None when it may run."""
        if plan.agent in self.agents:
            return f"agents.{plan.agent}.mode"
        if plan.resource.kind in self.kinds:
            return f"llm.kinds.{plan.resource.kind}.mode"
        if self.models and plan.planner.startswith("llm:"):
            return "llm.mode"
        return None


@dataclass
class Shadows:
    """Records the plans the gate put in shadow, once each."""

    journal: PlanJournal
    status: StatusWriter
    metrics: Metrics
    _recorded: dict[ResourceKey, tuple[str, str]] = field(default_factory=dict)  # key: (content hash, plan id)

    async def record(self, entry: DesiredEntry, record: PlanRecord, would: str) -> Outcome:
        """Store `record` (a plan in shadow; `would` is what the policy would have decided) unless that very plan
        was stored last for this resource, and say in the status what would have run."""
        plan = record.plan
        digest = plan.content_hash()
        recorded = self._recorded.get(entry.key)
        if recorded is None or recorded[0] != digest:
            record.state = PlanState.SHADOW
            for step in record.steps:
                step.state = StepState.SKIPPED
            await self.journal.save(record)
            recorded = self._recorded[entry.key] = (digest, plan.id)
            self.metrics.shadow_plans.labels(kind=entry.key.kind, decision=would).inc()
            log.info("plan.shadow", plan_id=plan.id, would=would, risk=plan.risk.value, reasoning=plan.reasoning)
        planned = "; ".join(step.description or step.tool for step in plan.steps)
        await self.status.write(
            entry.key, phase=Phase.PENDING, revision=entry.mod_revision, deleted=entry.deleted,
            message=f"shadow mode: plan {recorded[1]} would have run ({would}, risk {plan.risk.value}): {planned}",
        )  # fmt: skip
        return Outcome(Result.SHADOW)
