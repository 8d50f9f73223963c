"""Runs an accepted plan: begins it, drives the executor, and settles the outcome with its status.

`run` begins the plan (its record and status `Executing` in one transaction,
refused when the desired value has moved on), runs its steps, and settles:
the final record, the final status and the resource's new observation go to
etcd together (`journal.py`), and the observer's baseline moves to what the
resource looks like once converged. Each way a plan can end has one outcome:

- succeeded: the resource is observed again and its agent asked whether it
  is now as desired (`verify.py`); only then `Converged`, else `Failed`
  with "plan ran but the resource did not converge" and the difference;
  for a deleted resource, its status and observation
  are removed and its tombstone dropped (`remove`);
- failed: `Failed` with the step's error, then a `TemporaryError`, so the key
  is retried with backoff; the flap guard remembers the error;
- superseded: the record says so and the key is planned again at once;
- interrupted by shutdown: `Pending`, and the plan is resumed at the next start;
- refused at begin: nothing was written or run (`STALE`); the key is looked
  at again once the cache has caught up with etcd.

If etcd fails a write mid-plan, the record in memory is the truth: it is
kept (`Unfinished`) for the retry, which settles or continues that record
(`resume.py`) and never plans afresh a step that may have run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import structlog

from plans import Observed, PlanRecord, PlanState, Resource, ResourceKey, RollbackMode, StepState, TemporaryError
from policies.limits import FlapGuard
from reconciler.cache import Cache, DesiredEntry
from reconciler.executor import Executor
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.observer import Observer
from reconciler.outcome import Outcome, Result
from reconciler.resume import Unfinished
from reconciler.rollback import Rollbacks, is_rollback
from reconciler.status import Phase, StatusWriter, guard_for
from reconciler.store import Guard, Op
from reconciler.verify import Verifier
from tools import ValidatedStep

log = structlog.get_logger("setpoint.runner")

SECRET_LABEL = "setpoint/secret"  # "true": the resource's previous values are never kept for a rollback
STALE_RECHECK_SECONDS = 0.1  # the watch delivers the change that made a write stale within milliseconds


class Runner:
    def __init__(
        self,
        *,
        executor: Executor,
        journal: PlanJournal,
        status: StatusWriter,
        observer: Observer,
        cache: Cache,
        keys: KeySpace,
        flap: FlapGuard,
        unfinished: Unfinished,
        verifier: Verifier,
        rollbacks: Rollbacks,
    ) -> None:
        self._rollbacks = rollbacks
        self._executor = executor
        self._verifier = verifier
        self._journal = journal
        self._status = status
        self._observer = observer
        self._cache = cache
        self._keys = keys
        self._flap = flap
        self._unfinished = unfinished

    async def run(
        self,
        entry: DesiredEntry,
        record: PlanRecord,
        steps: Sequence[ValidatedStep],
        *,
        message: str,
        stored: bool,
        consume: tuple[Guard, Op] | None = None,
    ) -> Outcome:
        """Run `steps` of `record` for `entry`; `stored` when the record is already in etcd (a resumed plan).

        `consume` is an approval: its guard joins the begin write and its op (the approval's delete) is
        made by it, so an approval starts its plan once at most."""
        key, plan = entry.key, record.plan
        guard = [self._guard(entry), consume[0]] if consume is not None else self._guard(entry)
        also = [consume[1]] if consume is not None else []

        async def begin(r: PlanRecord) -> bool:
            # A stored plan was counted when it first began: resuming it is not another plan.
            update = await self._status.prepare(
                key, phase=Phase.EXECUTING, revision=entry.mod_revision, message=message, plan_id=plan.id,
                recent_plans=None if stored else self._recent_plans(key), deleted=entry.deleted, answers=r.answers,
            )  # fmt: skip
            if not await self._journal.begin(r, guard=guard, status=update, also=also):
                return False
            if not stored:
                self._flap.record(key)
            log.info("plan.executing", steps=len(steps), risk=plan.risk.value, reasoning=plan.reasoning)
            return True

        with structlog.contextvars.bound_contextvars(plan_id=plan.id):
            try:
                execution = await self._executor.execute(
                    record, steps, begin=begin, current_revision=lambda: self._revision(entry),
                    secret=entry.resource is not None and entry.resource.labels.get(SECRET_LABEL) == "true",
                    labels=entry.resource.labels if entry.resource is not None else {},
                )  # fmt: skip
            except Exception:
                self._unfinished.keep(key, record)
                raise
            if execution.refused:
                if stored:
                    self._unfinished.keep(key, record)  # settled once the cache shows where the value went
                log.info("plan.stale")
                # Once the watch has brought the change that made it stale, that change has queued the key again
                # itself: a recheck would be one more reconcile (with writes coming fast, one per change).
                caught_up = self._cache.desired.get(key) is not entry
                return Outcome(Result.STALE, requeue_after=None if caught_up else STALE_RECHECK_SECONDS)
            if not execution.begun and not stored:  # stopped before its first write: nothing to settle
                result = Result.SUPERSEDED if record.state is PlanState.SUPERSEDED else Result.INTERRUPTED
                return Outcome(result, requeue_after=0 if result is Result.SUPERSEDED else None)
            return await self.settle(entry, record)

    async def settle(self, entry: DesiredEntry, record: PlanRecord) -> Outcome:
        """Write the outcome `record` holds, with the status that says it."""
        with structlog.contextvars.bound_contextvars(plan_id=record.plan.id):
            try:
                outcome = await self._settle(entry, record)
            except Exception:
                self._unfinished.keep(entry.key, record)
                raise
        if record.state is PlanState.FAILED:
            raise TemporaryError(record.message)
        return outcome

    async def remove(self, entry: DesiredEntry, record: PlanRecord | None) -> Outcome:
        """Forget a deleted resource: its status and observation go, with `record` when a plan tore it down."""
        key = entry.key
        guarded: list[Op] = [self._status.delete_op(key)]
        observation = self._observer.delete_op(key)
        if observation is not None:
            guarded.append(observation)
        try:
            removed = await self._journal.settle(record, guard=self._guard(entry), guarded=guarded)
        except BaseException:
            self._status.unknown(key)  # the delete may have been applied all the same
            raise
        if not removed:
            return Outcome(Result.STALE, requeue_after=STALE_RECHECK_SECONDS)  # re-created meanwhile
        self._status.forget(key)
        self._observer.forget(key)
        self._cache.forget_tombstone(key, entry.mod_revision)
        log.info("resource.removed")
        return Outcome(Result.REMOVED)

    async def _settle(self, entry: DesiredEntry, record: PlanRecord) -> Outcome:
        key, plan = entry.key, record.plan
        state = record.state
        if state is PlanState.SUPERSEDED:
            await self._journal.save(record)
            return Outcome(Result.SUPERSEDED, requeue_after=0)
        if state is PlanState.SUCCEEDED and entry.deleted:
            log.info("plan.succeeded")
            return await self.remove(entry, record)
        # Whatever the outcome, actual/ shows the world as the plan left it.
        observed, error = None, ""
        if entry.resource is not None and not entry.deleted:
            observed, error = await self._observe_after(entry.resource)
        put = self._observer.record_put(observed) if observed is not None else None
        if state is PlanState.SUCCEEDED and is_rollback(plan):  # back as it was: not as desired, and said so
            update = await self._status.prepare(
                key, phase=Phase.FAILED, revision=entry.mod_revision, plan_id=plan.id, last_error=plan.reasoning,
                message=f"rolled back by plan {plan.id}: the resource is as it was before, not at its desired state; "
                f"it is planned again at the next change or resync ({plan.reasoning})",
            )  # fmt: skip
            await self._journal.settle(record, guard=self._guard(entry), status=update, observed=put)
            log.warning("plan.rolled_back")
            return Outcome(Result.ROLLED_BACK)
        if state is PlanState.SUCCEEDED and not record.verification:  # a record settled again was verified before
            observing = self._observer.observing_agent(key.kind) is not None
            verification = await self._verifier.check(entry, observed, observing=observing, error=error)
            record.verification = verification.text
            if not verification.converged:
                record.state, record.message = PlanState.FAILED, verification.text
                state = record.state
                log.warning("plan.not_converged", reason=verification.text[:500])
        if state is PlanState.SUCCEEDED:
            update = await self._status.prepare(
                key, phase=Phase.CONVERGED, revision=entry.mod_revision, message=f"plan succeeded: {plan.reasoning}",
                plan_id=plan.id, applied=entry.resource, baseline=observed.state if observed is not None else None,
            )  # fmt: skip
            current = await self._journal.settle(record, guard=self._guard(entry), status=update, observed=put)
            self._flap.settled(key, error=None)
            if current:
                self._observer.mark_converged(key, observed.state if observed is not None else None)
            log.info("plan.succeeded")
            return Outcome(Result.CONVERGED)
        interrupted = state is PlanState.INTERRUPTED
        update = await self._status.prepare(
            key,
            phase=Phase.PENDING if interrupted else Phase.FAILED,
            revision=entry.mod_revision,
            message=f"interrupted by shutdown: {record.message}" if interrupted else record.message,
            plan_id=plan.id,
            last_error=None if interrupted else record.message,
            deleted=entry.deleted,
        )
        await self._journal.settle(record, guard=self._guard(entry), status=update, observed=put)
        if interrupted:
            return Outcome(Result.INTERRUPTED)
        self._flap.settled(key, error=record.message)
        step_failed = any(step.state is StepState.FAILED for step in record.steps)  # not a plan that did not verify
        if record.rollback is RollbackMode.APPROVE and step_failed and not entry.deleted and not is_rollback(plan):
            log.warning("plan.rollback", result=await self._rollbacks.request(entry, record, observed))
        return Outcome(Result.RETRY)

    async def _observe_after(self, resource: Resource) -> tuple[Observed | None, str]:
        """The resource as the plan left it, or None and why it could not be observed."""
        try:
            return await self._observer.observe(resource), ""
        except Exception as e:  # the plan ran: a failed look at its result must not undo the record of it
            log.warning("observe.after_plan_failed", error_type=type(e).__name__, error=str(e)[:300])
            return None, str(e)[:300] or type(e).__name__

    def _recent_plans(self, key: ResourceKey) -> list[datetime]:
        """When the plans in `key`'s flap window began, this one included: what its status remembers."""
        now = datetime.now(UTC)
        began = [now - timedelta(seconds=age) for age in self._flap.ages(key)] + [now]
        return began[-self._flap.max_plans :]

    def _guard(self, entry: DesiredEntry) -> Guard:
        return guard_for(self._keys, entry.key, revision=entry.mod_revision, deleted=entry.deleted)

    def _revision(self, entry: DesiredEntry) -> int | None:
        current = self._cache.desired.get(entry.key)
        if current is None:
            return None
        return current.mod_revision
