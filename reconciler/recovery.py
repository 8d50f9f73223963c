"""Finding plans a previous run left unfinished, so the controller can resume them instead of re-planning.

A plan is unfinished when its resource's status still names it and its
record says `executing` or `pending` (the daemon died mid-plan) or
`interrupted` (a shutdown stopped it between steps). A plan that failed with
an unknown step outcome keeps its resource held until the desired value
changes; that hold is found here too, so it survives restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from plans import PlanRecord, PlanState, ResourceKey
from reconciler.keys import KeySpace, Section
from reconciler.status import Phase, Status
from reconciler.store import EtcdStore

log = structlog.get_logger("setpoint.recovery")

UNFINISHED = (PlanState.EXECUTING, PlanState.PENDING, PlanState.INTERRUPTED)


@dataclass
class Recovered:
    unfinished: dict[ResourceKey, PlanRecord] = field(default_factory=dict)
    held: dict[ResourceKey, int] = field(default_factory=dict)  # key -> desired revision held at


async def find_unfinished(store: EtcdStore, keys: KeySpace) -> Recovered:
    found = Recovered()
    kvs, _ = await store.get_prefix(keys.section(Section.STATUS))
    for kv in kvs:
        parsed = keys.parse(kv.key)
        if parsed is None or parsed.resource is None:
            continue
        try:
            status = Status.model_validate_json(kv.value)
        except ValueError:
            continue
        if status.plan_id is None or status.phase not in (Phase.EXECUTING, Phase.PENDING, Phase.FAILED):
            continue
        record_kv = await store.get(keys.plan(status.plan_id))
        if record_kv is None:
            continue  # the daemon stopped before the plan's first journal entry: nothing ran
        try:
            record = PlanRecord.model_validate_json(record_kv.value)
        except ValueError as e:
            log.error("recovery.unreadable_plan", key=str(parsed.resource), plan_id=status.plan_id, error=str(e)[:300])
            continue
        if record.state in UNFINISHED:
            found.unfinished[parsed.resource] = record
        elif record.state is PlanState.FAILED and record.outcome_unknown_step is not None:
            found.held[parsed.resource] = record.plan.desired_revision
    if found.unfinished or found.held:
        log.info("recovery.found", unfinished=len(found.unfinished), held=len(found.held))
    return found
