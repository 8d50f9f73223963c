"""A person's decision on a plan, written to `approvals/<plan-id>`: the one path for the CLI and the HTTP API.

`decide` reads the plan record, refuses a plan that is unknown or not in a
state the decision applies to, and writes the decision with the plan's hash
(or the hash the person saw, when they give one) in a transaction that
requires no undecided decision to be waiting already. The daemon then
checks the decision against the plan (hash, expiry, who may approve) and
records in the plan whether it was accepted or refused: writing a decision
is asking, not doing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from plans import Approval, ApprovalDecision, PlanRecord, PlanState
from reconciler.keys import PLAN_ID_PATTERN, KeySpace
from reconciler.store import EtcdStore, Guard, Put

# Which plan states each decision applies to.
_APPLIES = {
    ApprovalDecision.APPROVE: (PlanState.AWAITING_APPROVAL,),
    ApprovalDecision.REJECT: (PlanState.AWAITING_APPROVAL,),
    ApprovalDecision.REPLAN: (PlanState.AWAITING_APPROVAL, PlanState.REJECTED, PlanState.EXPIRED),
}


class Refused(StrEnum):
    NOT_FOUND = "not_found"
    NOT_APPLICABLE = "not_applicable"  # the plan is not awaiting approval (or not held, for replan)
    ALREADY_DECIDED = "already_decided"  # a decision is waiting for the daemon already


@dataclass(frozen=True, slots=True)
class Submitted:
    approval: Approval | None
    refused: Refused | None = None
    message: str = ""


async def read_record(store: EtcdStore, keys: KeySpace, plan_id: str) -> PlanRecord | None:
    """The plan record `plan_id`, or None when there is none (or the id could not be one)."""
    if PLAN_ID_PATTERN.fullmatch(plan_id) is None:
        return None
    kv = await store.get(keys.plan(plan_id))
    if kv is None:
        return None
    try:
        return PlanRecord.model_validate_json(kv.value)
    except ValueError:
        return None


async def decide(
    store: EtcdStore,
    keys: KeySpace,
    plan_id: str,
    decision: ApprovalDecision,
    *,
    by: str,
    reason: str = "",
    source: str,
    plan_hash: str | None = None,
) -> Submitted:
    """Write `decision` on plan `plan_id`, or say why not (`Submitted.refused`, with a one-sentence message)."""
    record = await read_record(store, keys, plan_id)
    if record is None:
        return Submitted(None, Refused.NOT_FOUND, f"no plan {plan_id!r}")
    if record.state not in _APPLIES[decision]:
        wanted = (
            "awaiting approval" if decision is not ApprovalDecision.REPLAN else "awaiting approval, rejected or expired"
        )
        return Submitted(
            None, Refused.NOT_APPLICABLE,
            f"plan {plan_id} is {record.state.value.replace('_', ' ')}, not {wanted}",
        )  # fmt: skip
    approval = Approval(
        decision=decision,
        plan_hash=plan_hash or record.plan_hash,
        by=by,
        reason=reason,
        at=datetime.now(UTC),
        source=source,
    )
    key = keys.approval(plan_id)
    if not await store.txn(guard=Guard(key, 0), then=[Put(key, approval.model_dump_json().encode())]):
        return Submitted(
            None, Refused.ALREADY_DECIDED,
            f"a decision on plan {plan_id} is already waiting for the daemon to take it",
        )  # fmt: skip
    return Submitted(approval)
