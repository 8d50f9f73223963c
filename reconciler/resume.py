"""Crash recovery, in one place: plans left unfinished, and resources held after an unknown outcome.

Plans are left unfinished two ways. A previous run died (or was stopped)
mid-plan: at start-up `Resumer.load` reads every status once (and seeds the
status writer with them) and, for each that still names a plan in flight,
that plan's record. Or etcd failed a journal write mid-plan: the runner
keeps the record in memory (`Unfinished.keep`), because it, not etcd, says
what ran. Either way the key's next reconcile finishes that record instead
of planning afresh:

- a record whose outcome was decided but not written is settled, if its
  desired value is still the one it was made for; else the outcome goes to
  its record only, and the key is planned afresh for the value there is now;
- a step found `running` is run again if its tool is idempotent; else its
  tool's read-only `verify` decides (done: succeeded; not done: run it);
  without an answer the plan fails with "step N outcome unknown" and the
  resource is *held*: not planned again, across restarts too, until its
  desired value changes (the operator's word that they have looked);
- a plan whose desired value moved on while setpoint was down is superseded;
- a plan that shadow mode now covers is not resumed (superseded, saying
  so), nor is a step found `running` run again;
- a rollback step found `running` is not run again: it is marked failed,
  its outcome unknown, and the plan fails saying its rollback did not
  finish (the resource is then planned forward afresh, as after any
  failed plan);
- otherwise the steps still pending run, in the same plan.

The limits remember across restarts too, through the statuses: the flap
guard is given the times the recent plans for each resource began, and the
observer the state each resource looked like when it converged, so that a
mass failure seen right after a restart still pauses healing (the daemon
observes everything once before any worker starts).

An etcd blip while loading is retried with backoff, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog

from plans import PlanRecord, PlanState, PlanValidationError, ResourceKey, StepState
from policies.limits import FlapGuard
from reconciler.cache import Cache, DesiredEntry
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace, Section
from reconciler.observer import Observer
from reconciler.outcome import Outcome, Result
from reconciler.shadow import ShadowMode
from reconciler.status import Phase, StatusWriter, guard_for, parse_status
from reconciler.store import EtcdStore, KeyValue, StoreError, StoreUnavailableError
from tools import ToolContext, ToolRegistry, ValidatedStep

if TYPE_CHECKING:
    from reconciler.approvals import Approvals
    from reconciler.runner import Runner

log = structlog.get_logger("setpoint.resume")

_IN_FLIGHT = (PlanState.EXECUTING, PlanState.PENDING, PlanState.INTERRUPTED)
_DECIDED = (PlanState.SUCCEEDED, PlanState.FAILED, PlanState.SUPERSEDED)
_PERSON = (PlanState.AWAITING_APPROVAL, PlanState.REJECTED, PlanState.EXPIRED)
# Statuses whose plan is read at start-up: one in flight or held, one waiting for or refused by a person.
_ADOPTED = (Phase.EXECUTING, Phase.PENDING, Phase.FAILED, Phase.AWAITING_APPROVAL, Phase.BLOCKED)


class Unfinished:
    """Plans to finish instead of re-planning, and keys held at a desired revision."""

    def __init__(self) -> None:
        self._records: dict[ResourceKey, PlanRecord] = {}
        self._held: dict[ResourceKey, int] = {}

    def keep(self, key: ResourceKey, record: PlanRecord) -> None:
        self._records[key] = record

    def take(self, key: ResourceKey) -> PlanRecord | None:
        return self._records.pop(key, None)

    def hold(self, key: ResourceKey, revision: int) -> None:
        self._held[key] = revision

    def held(self, entry: DesiredEntry) -> bool:
        """Whether `entry` is held; a hold ends when the desired value changes."""
        revision = self._held.get(entry.key)
        if revision is None:
            return False
        if revision == entry.mod_revision and not entry.deleted:
            return True
        del self._held[entry.key]
        return False

    @property
    def keys(self) -> set[ResourceKey]:
        return {*self._records, *self._held}


class Resumer:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        tools: ToolRegistry,
        status: StatusWriter,
        journal: PlanJournal,
        runner: Runner,
        unfinished: Unfinished,
        cache: Cache,
        flap: FlapGuard,
        observer: Observer,
        approvals: Approvals,
        shadow: ShadowMode,
    ) -> None:
        """`shadow`: the plans that may not run, resumed ones included."""
        self._shadow = shadow
        self._store = store
        self._keys = keys
        self._tools = tools
        self._status = status
        self._journal = journal
        self._runner = runner
        self._unfinished = unfinished
        self._cache = cache
        self._flap = flap
        self._observer = observer
        self._approvals = approvals

    async def load(self, stop: asyncio.Event) -> set[ResourceKey] | None:
        """Read what a previous run left; the keys to reconcile first, or None if `stop` came first."""
        delay = 0.2
        while not stop.is_set():
            try:
                statuses, _ = await self._store.get_prefix(self._keys.section(Section.STATUS))
                await self._adopt(statuses)
            except (StoreUnavailableError, StoreError) as e:
                log.warning("recovery.unavailable", error=str(e)[:300], retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            self._status.seed(statuses)
            self._restore_limits(statuses)
            return self._unfinished.keys
        return None

    def _restore_limits(self, statuses: Iterable[KeyValue]) -> None:
        """Give the flap guard and the observer back what they knew before the restart."""
        now = datetime.now(UTC)
        for kv in statuses:
            parsed = self._keys.parse(kv.key)
            status = parse_status(kv.value)
            if parsed is None or parsed.resource is None or status is None:
                continue
            key = parsed.resource
            for began in sorted(status.recent_plans):
                self._flap.record(key, ago=max(0.0, (now - began).total_seconds()))
            if status.last_error is not None:
                self._flap.settled(key, error=status.last_error)
            entry = self._cache.desired.get(key)
            if status.baseline is not None and entry is not None and entry.valid and not entry.deleted:
                if entry.resource == status.applied:  # it converged to this very value
                    self._observer.mark_converged(key, status.baseline)

    async def _adopt(self, statuses: Iterable[KeyValue]) -> None:
        found = unfinished = 0
        for kv in statuses:
            parsed = self._keys.parse(kv.key)
            if parsed is None or parsed.resource is None:
                continue
            status = parse_status(kv.value)
            if status is None:
                continue
            if status.plan_id is None or status.phase not in _ADOPTED:
                continue
            record_kv = await self._store.get(self._keys.plan(status.plan_id))
            if record_kv is None:
                continue  # the daemon stopped before the plan's first journal entry: nothing ran
            try:
                record = PlanRecord.model_validate_json(record_kv.value)
            except ValueError as e:
                log.error(
                    "recovery.unreadable_plan", key=str(parsed.resource), plan_id=status.plan_id, error=str(e)[:300]
                )
                continue
            if record.state in _PERSON:
                # Waiting (maybe approved, and held back by a limit), or held by a rejection or expiry.
                self._approvals.adopt(parsed.resource, record)
            elif record.state in _IN_FLIGHT:
                self._unfinished.keep(parsed.resource, record)
                unfinished += 1
            elif record.state is PlanState.FAILED and record.outcome_unknown_step is not None:
                self._unfinished.hold(parsed.resource, record.plan.desired_revision)
                found += 1
        if found or unfinished:
            log.info("recovery.found", unfinished=unfinished, held=found)

    async def resume(self, entry: DesiredEntry) -> Outcome | None:
        """Finish the plan left unfinished for `entry`'s key; None when there is none, or it cannot go on
        and the key is to be planned afresh."""
        record = self._unfinished.take(entry.key)
        if record is None:
            return None
        with structlog.contextvars.bound_contextvars(plan_id=record.plan.id):
            return await self._resume(entry, record)

    async def _resume(self, entry: DesiredEntry, record: PlanRecord) -> Outcome | None:
        plan = record.plan
        try:
            _, steps = self._tools.validate_plan(plan)
        except PlanValidationError as e:
            record.state, record.message = PlanState.FAILED, f"cannot resume: {e}"
            await self._save(entry, record)
            return None
        current = plan.desired_revision == entry.mod_revision
        if record.outcome_unknown_step is not None:  # settled as unknown by an attempt whose write failed
            if current:
                return await self._hold(entry, record, steps[record.outcome_unknown_step - 1])
            await self._save(entry, record)
            return None  # the operator changed the value: plan afresh
        shadowed = self._shadow.reason(plan)
        if shadowed is not None and record.state not in _DECIDED:  # nothing of it runs, not even a step re-run
            record.state = PlanState.SUPERSEDED
            record.message = f"not resumed: {shadowed} is shadow, so its plans never run"
            _skip_pending(record)
            await self._save(entry, record)
            log.warning("plan.not_resumed", reason=record.message)
            return None  # planned afresh: in shadow, recorded only
        for validated in steps:
            if record.steps[validated.index].state is StepState.RUNNING:
                if not await self._settle_step(validated, record) and current:
                    return await self._hold(entry, record, validated)
        for undo in record.rolled_back:  # a rollback cut off: never run again blindly, and said so
            if undo.state is StepState.RUNNING:
                undo.state = StepState.FAILED
                undo.message = "cut off when setpoint stopped: whether it took effect is unknown"
                record.message = record.message or (
                    f"a step failed, and undoing step {undo.undoes + 1} was cut off when setpoint stopped; "
                    "the rollback did not finish"
                )
        if record.outcome_unknown_step is None and any(s.state is StepState.FAILED for s in record.steps):
            record.state = PlanState.FAILED
            record.message = record.message or "a step of this plan failed before setpoint stopped"
        if record.state in _DECIDED:  # decided, but the write saying so failed
            if current:
                return await self._runner.settle(entry, record)
            # Its outcome is about a value that is gone: record it, and plan for the value there is now.
            await self._save(entry, record)
            return None
        stored = record.state is not PlanState.PENDING
        if not current:
            if not stored:
                return None  # never written, never run: nothing to record
            record.state, record.message = PlanState.SUPERSEDED, "desired state changed while the plan was stopped"
            _skip_pending(record)
            await self._save(entry, record)
            return None
        remaining = [v for v in steps if record.steps[v.index].state is StepState.PENDING]
        log.info("plan.resuming", steps_left=len(remaining))
        return await self._runner.run(
            entry, record, remaining, message=f"resuming: {plan.reasoning}", stored=stored
        )

    async def _settle_step(self, validated: ValidatedStep, record: PlanRecord) -> bool:
        """Decide a step found `running` after a crash; False when its outcome cannot be known."""
        journal = record.steps[validated.index]
        tool = validated.tool
        if tool.idempotent:
            journal.state = StepState.PENDING
            journal.message = "cut off by a restart; the tool is idempotent: run again"
            return True
        ctx = ToolContext(plan_id=record.plan.id, resource=record.plan.resource, step_index=validated.index)
        try:
            verdict = await tool.verify(validated.params, ctx)
        except Exception as e:  # a verify bug means "cannot tell", never "safe to repeat"
            log.warning("step.verify_failed", tool=tool.name, error=str(e)[:300])
            verdict = None
        if verdict is True:
            journal.state, journal.message = StepState.SUCCEEDED, "cut off by a restart; verified as done"
            return True
        if verdict is False:
            journal.state, journal.message = StepState.PENDING, "cut off by a restart; verified as not done"
            return True
        journal.state = StepState.FAILED
        journal.message = "cut off by a restart; outcome unknown (not idempotent, cannot verify)"
        record.outcome_unknown_step = validated.index + 1
        return False

    async def _hold(self, entry: DesiredEntry, record: PlanRecord, validated: ValidatedStep) -> Outcome:
        step = validated.index + 1
        message = (
            f"step {step} outcome unknown: setpoint stopped while {validated.tool.name} ran, and that tool is "
            f"neither idempotent nor verifiable; check by hand, then change the desired value to go on"
        )
        record.state, record.message = PlanState.FAILED, message
        _skip_pending(record)
        update = await self._status.prepare(
            entry.key, phase=Phase.FAILED, revision=entry.mod_revision, message=message, plan_id=record.plan.id,
            deleted=entry.deleted,
        )
        guard = guard_for(self._keys, entry.key, revision=entry.mod_revision, deleted=entry.deleted)
        try:
            await self._journal.settle(record, guard=guard, status=update)
        except Exception:
            self._unfinished.keep(entry.key, record)
            raise
        self._unfinished.hold(entry.key, entry.mod_revision)
        log.error("plan.outcome_unknown", step=step, tool=validated.tool.name)
        return Outcome(Result.OUTCOME_UNKNOWN)

    async def _save(self, entry: DesiredEntry, record: PlanRecord) -> None:
        try:
            await self._journal.save(record)
        except Exception:
            self._unfinished.keep(entry.key, record)
            raise


def _skip_pending(record: PlanRecord) -> None:
    for journal in record.steps:
        if journal.state is StepState.PENDING:
            journal.state = StepState.SKIPPED
