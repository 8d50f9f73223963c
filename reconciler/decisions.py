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

from pydantic import ValidationError

from plans import Approval, ApprovalDecision, PlanRecord, PlanState
from plans.errors import describe_validation_error
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
    NOT_APPLICABLE = "not_applicable"  # the plan is not awaiting approval (or not held, for replan), or expired
    ALREADY_DECIDED = "already_decided"  # a decision is waiting for the daemon already, or the plan just changed
    INVALID = "invalid"  # the decision itself is malformed (who, why, which hash)


@dataclass(frozen=True, slots=True)
class Submitted:
    approval: Approval | None
    refused: Refused | None = None
    message: str = ""


async def read_record(store: EtcdStore, keys: KeySpace, plan_id: str) -> PlanRecord | None:
    """The plan record `plan_id`, or None when there is none (or the id could not be one)."""
    found = await _read(store, keys, plan_id)
    return found[0] if found is not None else None


async def _read(store: EtcdStore, keys: KeySpace, plan_id: str) -> tuple[PlanRecord, int] | None:
    if PLAN_ID_PATTERN.fullmatch(plan_id) is None:
        return None
    kv = await store.get(keys.plan(plan_id))
    if kv is None:
        return None
    try:
        return PlanRecord.model_validate_json(kv.value), kv.mod_revision
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
    """Write `decision` on plan `plan_id`, or say why not (`Submitted.refused`, with a one-sentence message).

    `plan_hash` is the hash the person reviewed: the whole hash, or at least its first 12 digits (as
    `setpoint approve` prints it); a plan whose hash differs is refused here, before anything is written."""
    found = await _read(store, keys, plan_id)
    if found is None:
        return Submitted(None, Refused.NOT_FOUND, f"no plan {plan_id!r}")
    record, revision = found
    if record.state not in _APPLIES[decision]:
        wanted = "awaiting approval" if decision is not ApprovalDecision.REPLAN else "awaiting approval or held"
        state = record.state.value.replace("_", " ")
        return Submitted(None, Refused.NOT_APPLICABLE, f"plan {plan_id} is {state}, not {wanted}")
    expired = record.expires_at is not None and record.expires_at <= datetime.now(UTC)
    if expired and record.state is PlanState.AWAITING_APPROVAL and decision is not ApprovalDecision.REPLAN:
        return Submitted(
            None, Refused.NOT_APPLICABLE, f"plan {plan_id} expired at {record.expires_at:%Y-%m-%d %H:%M:%S}"
        )
    if plan_hash is not None:
        if len(plan_hash) < 12 or not record.plan_hash.startswith(plan_hash.lower()):
            return Submitted(
                None, Refused.INVALID,
                f"plan {plan_id}'s hash is {record.plan_hash[:12]}…, not {plan_hash[:12]}: it is not the plan you "
                f"reviewed (give at least 12 digits of the hash `setpoint plans show` prints)",
            )  # fmt: skip
    try:
        approval = Approval(
            decision=decision, plan_hash=record.plan_hash, by=by, reason=reason, at=datetime.now(UTC), source=source
        )
    except ValidationError as e:
        return Submitted(None, Refused.INVALID, f"the decision is not valid: {describe_validation_error(e)}")
    key = keys.approval(plan_id)
    guards = [Guard(key, 0), Guard(keys.plan(plan_id), revision)]  # nothing waiting, and the plan unchanged
    if not await store.txn(guard=guards, then=[Put(key, approval.model_dump_json().encode())]):
        return Submitted(
            None, Refused.ALREADY_DECIDED,
            f"a decision on plan {plan_id} is already waiting for the daemon, or the plan changed meanwhile; "
            f"see `setpoint plans show {plan_id}`",
        )  # fmt: skip
    return Submitted(approval)
