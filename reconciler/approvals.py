"""Plans that wait for a person: stored, kept as they are, and run once when approved.

A plan the policy sends for approval is stored under `plans/<id>` in state
`awaiting_approval`, with the fingerprint of the observation it was made
from and an expiry, and the resource goes to `AwaitingApproval` (`request`).
It is not planned again while it waits. Each reconcile of the resource
reviews it instead (`review`):

- voided (and the resource planned afresh) when the desired value moved, or
  the resource no longer looks as it did when the plan was made, or every
  issue report it answers was resolved, or a person asked to `replan`;
- `expired` after `approvals.plan_ttl_seconds` without a decision;
- a decision under `approvals/<plan-id>` is taken only if it carries the
  plan's hash and comes from someone the deciding policy lets approve; a
  refused decision is recorded in the plan (`refusals`) and removed, and the
  plan keeps waiting;
- `rejected`: the resource is `Blocked`, naming who rejected and why;
- approved: the plan is handed back to run, with the approval's own guard
  and delete, so the transaction that starts it also consumes the approval:
  an approved plan starts once at most, across restarts too.

A rejected or expired plan holds its resource (`Blocked`) until the desired
value changes, or a person asks to `replan` (`closed`). What waits and what
is held is read back from the statuses at start-up (`adopt`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from plans import ApprovalDecision, ApprovalNote, PlanRecord, PlanState, ResourceKey, Snapshot
from policies import may_approve
from policies.hooks import Event, Notifier
from reconciler.cache import ApprovalEntry, Cache, DesiredEntry
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.outcome import Outcome, Result
from reconciler.status import Phase, StatusWriter, guard_for
from reconciler.store import Delete, EtcdStore, Guard, Op

log = structlog.get_logger("setpoint.approvals")

MAX_REFUSALS = 10  # kept in a plan record, newest last


@dataclass(frozen=True, slots=True)
class Review:
    """What to do with a plan awaiting approval: an outcome to return, an approved plan to run, or neither
    (nothing waits, or what waited was voided: plan afresh)."""

    outcome: Outcome | None = None
    approved: PlanRecord | None = None
    consume: tuple[Guard, Op] | None = None


@dataclass(frozen=True, slots=True)
class _Held:
    plan_id: str
    revision: int
    retiring: bool


class Approvals:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        status: StatusWriter,
        journal: PlanJournal,
        metrics: Metrics,
        notifier: Notifier,
        ttl_seconds: float,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._keys = keys
        self._cache = cache
        self._status = status
        self._journal = journal
        self._metrics = metrics
        self._notifier = notifier
        self.ttl_seconds = ttl_seconds
        self._now = now
        self._pending: dict[ResourceKey, PlanRecord] = {}
        self._held: dict[ResourceKey, _Held] = {}
        self._plans: dict[str, ResourceKey] = {}  # plan id -> resource, for pending and held plans
        self._unknown: dict[ResourceKey, str] = {}  # approved plans whose start write failed
        self._taken: set[tuple[str, int]] = set()  # decisions (plan id, revision) already taken or refused
        metrics.approvals_pending.set_function(lambda: len(self._pending))
        metrics.approvals_oldest_age.set_function(self._oldest_age)

    # -- what the watch and start-up tell it ---------------------------------------

    def waiting(self, key: ResourceKey) -> PlanRecord | None:
        """The plan waiting for approval for `key`, if one is."""
        return self._pending.get(key)

    def resource_of(self, plan_id: str) -> ResourceKey | None:
        """The resource whose waiting or held plan is `plan_id`: a decision on it concerns that resource."""
        return self._plans.get(plan_id)

    def adopt(self, key: ResourceKey, record: PlanRecord) -> None:
        """A plan found at start-up through `key`'s status: waiting, or holding the resource. A record whose
        plan does not match its hash (edited in etcd) is not adopted: the resource is planned afresh."""
        if record.plan.content_hash() != record.plan_hash:
            log.error("plan.hash_mismatch", key=str(key), plan_id=record.plan.id)
            return
        if record.state is PlanState.AWAITING_APPROVAL:
            self._pending[key] = record
            self._plans[record.plan.id] = key
        elif record.state in (PlanState.REJECTED, PlanState.EXPIRED):
            self._hold(key, record)

    # -- the reconcile path ----------------------------------------------------------

    async def closed(self, entry: DesiredEntry) -> Outcome | None:
        """`Blocked` while a rejected or expired plan holds the resource; None when it is free to plan."""
        held = self._held.get(entry.key)
        if held is None:
            return None
        if not _same_value(entry, revision=held.revision, retiring=held.retiring):
            self._release(entry.key)  # a new desired value is the operator's word
            return None
        decision = self._decision(held.plan_id)
        if decision is None:
            return Outcome(Result.BLOCKED)
        guard, delete = self._consume_op(held.plan_id, decision)
        await self._store.txn(guard=guard, then=[delete])  # taken, or refused: either way it is done with
        self._done(decision)
        if decision.approval is None or decision.approval.decision is not ApprovalDecision.REPLAN:
            log.warning("approval.refused", plan_id=held.plan_id, reason="the plan is no longer awaiting approval")
            self._metrics.approvals.labels(result="refused").inc()
            return Outcome(Result.BLOCKED)
        self._release(entry.key)
        self._metrics.approvals.labels(result="replanned").inc()
        log.info("plan.replan", plan_id=held.plan_id, by=decision.approval.by)
        return None

    async def recheck(self, key: ResourceKey) -> PlanRecord | None:
        """After a failed start of an approved plan: read its record back. Still waiting: it waits (and its
        approval with it). Begun after all (the write was applied, the answer lost): that record, to resume."""
        plan_id = self._unknown.get(key)
        if plan_id is None:
            return None
        kv = await self._store.get(self._keys.plan(plan_id))
        del self._unknown[key]
        record = PlanRecord.model_validate_json(kv.value) if kv is not None else None
        if record is not None and record.state is PlanState.AWAITING_APPROVAL:
            self._pending[key] = record
            return None
        self._forget(key, plan_id)
        return record if record is not None and record.state is PlanState.EXECUTING else None

    def unknown(self, key: ResourceKey, plan_id: str) -> None:
        """The write that starts the approved `plan_id` failed; etcd may or may not have applied it."""
        self._unknown[key] = plan_id

    async def abandon(self, key: ResourceKey, why: str) -> None:
        """`key` is forgotten (removed, released, kept): a plan waiting for it is void, a hold is lifted."""
        self._release(key)
        record = self._pending.get(key)
        if record is not None:
            await self._void(key, record, why)

    async def request(self, entry: DesiredEntry, snapshot: Snapshot, record: PlanRecord, message: str) -> Outcome:
        """Store `record` to wait for approval, with status `AwaitingApproval`, and tell the hooks."""
        record = record.model_copy(deep=True)
        record.state = PlanState.AWAITING_APPROVAL
        record.retiring = entry.deleted
        record.observed_fingerprint = snapshot.actual_fingerprint()
        record.expires_at = self._now() + timedelta(seconds=self.ttl_seconds)
        record.message = message
        update = await self._status.prepare(
            entry.key, phase=Phase.AWAITING_APPROVAL, revision=entry.mod_revision, message=message,
            plan_id=record.plan.id, deleted=entry.deleted, answers=record.answers,
        )  # fmt: skip
        if not await self._journal.begin(record, guard=self._guard(entry), status=update):
            return Outcome(Result.STALE, requeue_after=0.1)
        self._pending[entry.key] = record
        self._plans[record.plan.id] = entry.key
        log.warning(
            "plan.awaiting_approval", plan_id=record.plan.id, risk=record.plan.risk.value, rule=record.decision_rule,
            plan_hash=record.plan_hash,
        )  # fmt: skip
        self._notifier.send(Event.APPROVAL_REQUESTED, record, labels=_labels(entry))
        return Outcome(Result.AWAITING_APPROVAL, requeue_after=self.ttl_seconds)

    async def review(self, entry: DesiredEntry, snapshot: Snapshot, approvers: Sequence[str]) -> Review:
        """Review the plan waiting for `entry`'s resource, if one is (see the module's docstring); `approvers`
        are who the policies in force let approve it."""
        record = self._pending.get(entry.key)
        if record is None:
            return Review()
        with structlog.contextvars.bound_contextvars(plan_id=record.plan.id):
            if not _same_value(entry, revision=record.plan.desired_revision, retiring=record.retiring):
                await self._void(entry.key, record, "the desired value changed before anyone decided")
                return Review()
            if snapshot.actual_fingerprint() != record.observed_fingerprint:
                await self._void(entry.key, record, "the resource changed before anyone decided; planned again")
                return Review()
            open_reports = {(issue.id, issue.report) for issue in self._cache.open_issues(entry.key)}
            if record.answers and not any((a.id, a.report) in open_reports for a in record.answers):
                await self._void(entry.key, record, "the issues it answers were resolved before anyone decided")
                return Review()
            left = (record.expires_at - self._now()).total_seconds() if record.expires_at is not None else 0.0
            if left <= 0:  # before any decision: one that came too late is refused by `closed`
                return Review(await self._expire(entry, record))
            decision = self._decision(record.plan.id)
            if decision is not None:
                return await self._decided(entry, record, decision, approvers)
            return Review(Outcome(Result.AWAITING_APPROVAL, requeue_after=left))

    def started(self, key: ResourceKey, record: PlanRecord) -> None:
        """The approved `record` began (and took its approval): it waits no longer."""
        decision = self._cache.approvals.get(record.plan.id)
        if decision is not None:
            self._done(decision)
        self._forget(key, record.plan.id)
        self._metrics.approvals.labels(result="approved").inc()
        log.info("plan.approved", plan_id=record.plan.id, by=record.approval.by if record.approval else None)

    def finished(self, record: PlanRecord, labels: dict[str, str]) -> None:
        """An approved or notify plan ended: tell the hooks how."""
        self._notifier.send(Event.OUTCOME, record, labels=labels)

    def announce(self, record: PlanRecord, labels: dict[str, str]) -> None:
        """A plan under a `notify` policy starts."""
        self._notifier.send(Event.NOTIFY, record, labels=labels)

    # -- decisions -------------------------------------------------------------------

    async def _decided(
        self, entry: DesiredEntry, record: PlanRecord, decision: ApprovalEntry, approvers: Sequence[str]
    ) -> Review:
        approval = decision.approval
        refusal = self._refusal(record, decision, approvers)
        if refusal is not None:
            await self._refuse(record, decision, refusal)
            return Review(Outcome(Result.AWAITING_APPROVAL, requeue_after=0))  # expiry is checked again
        assert approval is not None
        note = ApprovalNote(
            decision=approval.decision.value, by=approval.by, reason=approval.reason, at=approval.at,
            source=approval.source,
        )  # fmt: skip
        consume = self._consume_op(record.plan.id, decision)
        if approval.decision is ApprovalDecision.REPLAN:
            await self._void(entry.key, record, f"{approval.by} asked to plan again", also=[consume[1]])
            self._done(decision)
            self._metrics.approvals.labels(result="replanned").inc()
            return Review()
        if approval.decision is ApprovalDecision.REJECT:
            outcome = await self._reject(entry, record, note, consume[1])
            self._done(decision)
            return Review(outcome)
        approved = record.model_copy(deep=True)
        approved.approval = note
        return Review(approved=approved, consume=consume)

    def _refusal(self, record: PlanRecord, decision: ApprovalEntry, approvers: Sequence[str]) -> str | None:
        """Why `decision` cannot be taken for `record`, or None when it can."""
        approval = decision.approval
        if approval is None:
            return f"the decision cannot be read: {decision.error}"
        if approval.decision is ApprovalDecision.REPLAN:
            return None  # anyone who may write decisions may ask for a fresh plan: it needs approval again
        if approval.plan_hash != record.plan_hash:
            return (
                f"it is for plan hash {approval.plan_hash[:12]}…, but this plan's hash is {record.plan_hash[:12]}…: "
                f"an approval is bound to the exact plan"
            )
        if record.plan.content_hash() != record.plan_hash:
            return "the stored plan does not match its own hash: it was changed after it was made"
        if not may_approve(approvers, approval.by):
            return f"{approval.by} may not decide on this plan (approvers: {', '.join(approvers)})"
        return None

    async def _refuse(self, record: PlanRecord, decision: ApprovalEntry, why: str) -> None:
        approval = decision.approval
        note = ApprovalNote(
            decision=approval.decision.value if approval else "unreadable",
            by=approval.by if approval else "unknown", reason=approval.reason if approval else "",
            at=approval.at if approval else self._now(), source=approval.source if approval else "", refused=why,
        )  # fmt: skip
        refused = record.model_copy(update={"refusals": [*record.refusals, note][-MAX_REFUSALS:]})
        guard, delete = self._consume_op(record.plan.id, decision)
        # Recorded with the decision's removal, or not at all: a decision already taken is not refused twice.
        if await self._store.txn(guard=guard, then=[self._journal.record_put(refused), delete]):
            record.refusals = refused.refusals
        self._done(decision)
        self._metrics.approvals.labels(result="refused").inc()
        log.warning("approval.refused", by=note.by, decision=note.decision, reason=why)

    async def _reject(self, entry: DesiredEntry, record: PlanRecord, note: ApprovalNote, delete: Op) -> Outcome:
        record.state, record.approval = PlanState.REJECTED, note
        record.message = f"rejected by {note.by}" + (f": {note.reason}" if note.reason else "")
        await self._close(entry, record, f"{record.message}; change the desired value or run `setpoint replan "
                          f"{entry.key}` to plan again", also=[delete])  # fmt: skip
        self._metrics.approvals.labels(result="rejected").inc()
        log.warning("plan.rejected", by=note.by, reason=note.reason)
        self._notifier.send(Event.REJECTED, record, labels=_labels(entry))
        return Outcome(Result.BLOCKED)

    async def _expire(self, entry: DesiredEntry, record: PlanRecord) -> Outcome:
        record.state = PlanState.EXPIRED
        record.message = f"nobody decided within {self.ttl_seconds:g} s (approvals.plan_ttl_seconds)"
        # A decision that came too late is done with too.
        late: list[Op] = []
        decision = self._decision(record.plan.id)
        if decision is not None:
            late.append(Delete(self._keys.approval(record.plan.id)))
            self._done(decision)
        message = f"approval expired: {record.message}; run `setpoint replan {entry.key}` to plan again"
        await self._close(entry, record, message, also=late)
        self._metrics.approvals.labels(result="expired").inc()
        log.warning("plan.expired")
        self._notifier.send(Event.EXPIRED, record, labels=_labels(entry))
        return Outcome(Result.BLOCKED)

    async def _close(self, entry: DesiredEntry, record: PlanRecord, message: str, also: list[Op] | None = None) -> None:
        """Record how `record` ended and hold the resource `Blocked` with `message`."""
        update = await self._status.prepare(
            entry.key, phase=Phase.BLOCKED, revision=entry.mod_revision, message=message, plan_id=record.plan.id,
            deleted=entry.deleted,
        )
        await self._journal.settle(record, guard=self._guard(entry), status=update, also=also or [])
        self._pending.pop(entry.key, None)
        self._hold(entry.key, record)

    async def void(self, key: ResourceKey, record: PlanRecord, why: str, consume: tuple[Guard, Op] | None) -> None:
        """An approved plan that cannot run after all: record why, and consume its approval."""
        await self._void(key, record, why, also=[consume[1]] if consume is not None else None)

    async def _void(self, key: ResourceKey, record: PlanRecord, why: str, also: list[Op] | None = None) -> None:
        record.state, record.message = PlanState.VOIDED, why
        await self._store.txn(then=[self._journal.record_put(record), *(also or [])])
        self._forget(key, record.plan.id)
        self._metrics.approvals.labels(result="voided").inc()
        log.info("plan.voided", plan_id=record.plan.id, reason=why)

    # -- bookkeeping -----------------------------------------------------------------

    def _decision(self, plan_id: str) -> ApprovalEntry | None:
        """The decision on `plan_id` in the cache, unless it was already taken or refused (the watch has not
        yet delivered its removal)."""
        decision = self._cache.approvals.get(plan_id)
        if decision is None:
            self._taken = {(p, r) for p, r in self._taken if p != plan_id}
            return None
        return None if (plan_id, decision.mod_revision) in self._taken else decision

    def _done(self, decision: ApprovalEntry) -> None:
        self._taken.add((decision.plan_id, decision.mod_revision))

    def _consume_op(self, plan_id: str, decision: ApprovalEntry) -> tuple[Guard, Op]:
        key = self._keys.approval(plan_id)
        return Guard(key, decision.mod_revision), Delete(key)

    def _guard(self, entry: DesiredEntry) -> Guard:
        return guard_for(self._keys, entry.key, revision=entry.mod_revision, deleted=entry.deleted)

    def _hold(self, key: ResourceKey, record: PlanRecord) -> None:
        self._held[key] = _Held(record.plan.id, record.plan.desired_revision, record.retiring)
        self._plans[record.plan.id] = key

    def _release(self, key: ResourceKey) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._plans.pop(held.plan_id, None)

    def _forget(self, key: ResourceKey, plan_id: str) -> None:
        if self._pending.get(key) is not None and self._pending[key].plan.id == plan_id:
            del self._pending[key]
        self._plans.pop(plan_id, None)

    def _oldest_age(self) -> float:
        created = [r.created_at for r in self._pending.values()]
        return (self._now() - min(created)).total_seconds() if created else 0.0


def _same_value(entry: DesiredEntry, *, revision: int, retiring: bool) -> bool:
    """Whether `entry` is still the desired value a plan for `revision` (`retiring`: a removal) was made for."""
    return entry.mod_revision == revision and entry.deleted == retiring


def _labels(entry: DesiredEntry) -> dict[str, str]:
    return dict(entry.resource.labels) if entry.resource is not None else {}
