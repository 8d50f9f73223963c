"""The worker loop: take a key, reconcile it from the cache, and handle the outcome in one place.

A reconcile request is only a key; the worker re-reads desired and actual
from the cache, so coalesced events and resyncs are handled the same way.
`reconcile` returns an `Outcome` or raises; `_handle` is the one outcome
switch: success forgets the key's backoff, a `TemporaryError` (or any
unexpected exception) requeues it with per-key backoff, a `PermanentError`
drops it until its inputs change, and `requeue_after` re-adds it later.

Before a plan that policy allows runs, two limits may hold it back: the
flap guard (too many plans for this key recently) and the max-unhealthy
pause (a plan that heals drift from a value the resource had already
converged to, while too large a share of its kind needs healing at once).
Either way the resource goes to `Blocked` with the reason and is looked at
again when the limit may have lifted. Workers start reconciles no faster
than the global rate limit.

After a restart, plans the previous run left unfinished are resumed, not
re-planned: completed steps are never run again, and a step found `running`
is re-run only if its tool is idempotent, else its tool's read-only `verify`
decides. Without an answer the plan fails with "step N outcome unknown" and
the resource is held (never re-planned, so the step is never repeated)
until its desired value changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog
from aiolimiter import AsyncLimiter

from agents import AgentRegistry
from plans import (
    ExecutionPlan,
    InvalidResourceError,
    Observed,
    PermanentError,
    PlanRecord,
    PlanState,
    PlanValidationError,
    Resource,
    ResourceKey,
    RiskLevel,
    StepState,
    TemporaryError,
)
from policies import Action, PolicySet
from policies.limits import FlapGuard, healing_paused
from reconciler.cache import Cache, DesiredEntry
from reconciler.executor import Executor
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.recovery import Recovered
from reconciler.settings import LimitsSettings
from reconciler.status import Phase, StatusWriter
from reconciler.store import MAX_REQUEST_BYTES
from reconciler.workqueue import ShutDownError, WorkQueue
from tools import ToolContext, ToolRegistry, ValidatedStep

log = structlog.get_logger("setpoint.controller")


HEALING_RECHECK_SECONDS = 30.0
MAX_RECORD_BYTES = MAX_REQUEST_BYTES - 16 * 1024  # room for the key and the journal's own growth


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str
    requeue_after: float | None = None


class Controller:
    def __init__(
        self,
        *,
        cache: Cache,
        queue: WorkQueue[ResourceKey],
        agents: AgentRegistry,
        tools: ToolRegistry,
        policies: PolicySet,
        executor: Executor,
        status: StatusWriter,
        observer: Observer,
        metrics: Metrics,
        flap_guard: FlapGuard,
        limits: LimitsSettings,
        rate_limit_per_second: float,
    ) -> None:
        self._cache = cache
        self._queue = queue
        self._agents = agents
        self._tools = tools
        self._policies = policies
        self._executor = executor
        self._status = status
        self._observer = observer
        self._metrics = metrics
        self._flap = flap_guard
        self._limits = limits
        self._rate = AsyncLimiter(max_rate=rate_limit_per_second, time_period=1.0)
        self._resume: dict[ResourceKey, PlanRecord] = {}
        self._held: dict[ResourceKey, int] = {}
        self._workers: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------

    def adopt(self, recovered: Recovered) -> None:
        """Take over what a previous run left: unfinished plans to resume and keys held at a revision."""
        self._resume.update(recovered.unfinished)
        self._held.update(recovered.held)
        for key in [*recovered.unfinished, *recovered.held]:
            self._queue.add(key)

    def start(self, workers: int) -> None:
        self._workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(workers)]

    async def shutdown(self, timeout: float) -> bool:
        """Stop taking keys, let running reconciles finish their current step; True if all drained in time."""
        self._executor.stopping.set()
        await self._queue.shutdown()
        if not self._workers:
            return True
        _, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return not pending

    async def _worker(self) -> None:
        while True:
            try:
                key = await self._queue.get()
            except ShutDownError:
                return
            try:
                await self._rate.acquire()
                await self._process(key)
            finally:
                self._queue.done(key)
                self._metrics.workqueue_depth.set(len(self._queue))

    # -- the outcome switch -----------------------------------------------------

    async def _process(self, key: ResourceKey) -> None:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(key=str(key), revision=None):
            try:
                outcome = await self.reconcile(key)
            except TemporaryError as e:
                if e.delay is not None:
                    delay = e.delay
                    self._queue.add_after(key, delay)
                else:
                    delay = self._queue.add_rate_limited(key)
                log.warning("reconcile.retry", error=str(e), retry_in=round(delay, 3))
                outcome = Outcome("retry")
            except PermanentError as e:
                self._queue.forget(key)
                log.warning("reconcile.terminal", error=str(e))
                outcome = Outcome("terminal")
            except Exception as e:
                delay = self._queue.add_rate_limited(key)
                log.exception("reconcile.error", error=str(e)[:500], retry_in=round(delay, 3))
                outcome = Outcome("error")
            else:
                if outcome.requeue_after is not None:
                    self._queue.forget(key)
                    self._queue.add_after(key, outcome.requeue_after)
                else:
                    self._queue.forget(key)
                log.info("reconcile.done", result=outcome.result)
        self._metrics.reconciles.labels(kind=key.kind, result=outcome.result).inc()
        self._metrics.reconcile_duration.labels(kind=key.kind).observe(time.monotonic() - started)

    # -- one reconcile ----------------------------------------------------------

    async def reconcile(self, key: ResourceKey) -> Outcome:
        entry = self._cache.desired.get(key)
        # Every log line of this reconcile says which desired revision it acted on.
        structlog.contextvars.bind_contextvars(revision=entry.mod_revision if entry is not None else None)
        if entry is None:
            # Nothing desired and nothing to tear down (say, an invalid value was
            # deleted): a status left behind would describe a resource that is gone.
            await self._status.delete(key)
            return Outcome("absent")
        if entry.error is not None or entry.resource is None:
            await self._invalid(entry, entry.error or "value could not be read")
            return Outcome("invalid")
        agent = self._agents.for_kind(key.kind)
        if agent is None:
            await self._invalid(entry, f"no agent handles kind {key.kind!r}")
            return Outcome("invalid")
        held = self._held.get(key)
        if held is not None:
            if held == entry.mod_revision and not entry.deleted:
                return Outcome("held")  # the Failed status written when the hold began still says why
            del self._held[key]
        record = self._resume.pop(key, None)
        if record is not None:
            try:
                resumed = await self._resume_plan(entry, record)
            except Exception:
                self._resume.setdefault(key, record)  # retry the resume, never a fresh plan
                raise
            if resumed is not None:
                return resumed
        try:
            actual = await self._actual(entry)
            if entry.deleted:
                plan = await agent.retire(entry.resource, actual)
            else:
                plan = await agent.reconcile(entry.resource, actual)
        except InvalidResourceError as e:
            await self._invalid(entry, str(e))
            return Outcome("invalid")
        plan = plan.model_copy(update={"desired_revision": entry.mod_revision})
        return await self._gate_and_run(entry, plan, actual)

    async def _actual(self, entry: DesiredEntry) -> Observed | None:
        assert entry.resource is not None
        observed = await self._observer.observe_now(entry.resource)
        if observed is not None:
            return observed
        cached = self._cache.actual.get(entry.key)
        return cached.observed if cached is not None else None

    async def _gate_and_run(self, entry: DesiredEntry, plan: ExecutionPlan, actual: Observed | None) -> Outcome:
        key = entry.key
        try:
            plan, steps = self._tools.validate_plan(plan)
        except PlanValidationError as e:
            await self._write(entry, Phase.FAILED, f"agent {plan.agent} made an invalid plan: {e}")
            raise
        if plan.is_empty:
            if entry.deleted:
                return await self._removed(entry)
            self._observer.mark_converged(key, actual.state if actual is not None else None)
            await self._write(entry, Phase.CONVERGED, plan.reasoning, applied=entry.resource)
            return Outcome("converged")
        decision = self._policies.evaluate(plan)
        self._metrics.plans.labels(decision=decision.action.value).inc()
        if decision.action is not Action.AUTO:
            why = "denied by policy" if decision.action is Action.DENY else "needs approval"
            message = (
                f"plan not run: {why} ({decision.reason}); "
                + ("approvals are not available in this version; " if decision.action is Action.APPROVE else "")
                + f"planned: {'; '.join(s.description for s in plan.steps)}"
            )
            await self._write(entry, Phase.BLOCKED, message)
            log.warning("plan.blocked", action=decision.action.value, reason=decision.reason, risk=plan.risk.value)
            return Outcome("blocked")
        record = PlanRecord.start(plan, decision=decision.action.value, decision_reason=decision.reason)
        size = len(record.model_dump_json())
        if size > MAX_RECORD_BYTES:
            # Nothing may run that cannot be journalled first.
            await self._invalid(
                entry,
                f"the plan for this value cannot be journalled: its record would be {size} bytes, more than "
                f"etcd accepts in one request ({MAX_RECORD_BYTES}); make the value smaller",
            )
            return Outcome("invalid")
        held = await self._held_by_limits(entry, plan)
        if held is not None:
            return held
        wait = self._executor.budget.wait_time()
        if wait > 0 and plan.risk > RiskLevel.READ_ONLY:
            # Not started yet: free the worker for other keys rather than wait in it.
            await self._write(entry, Phase.PENDING, "waiting for the mutating-steps-per-minute budget")
            return Outcome("budget", requeue_after=wait)
        self._flap.record(key)
        with structlog.contextvars.bound_contextvars(plan_id=plan.id):
            await self._write(entry, Phase.EXECUTING, plan.reasoning, plan_id=plan.id)
            log.info("plan.executing", steps=len(steps), risk=plan.risk.value, reasoning=plan.reasoning)
            state, message = await self._execute(entry, record, steps)
            return await self._after(entry, plan, state, message)

    async def _resume_plan(self, entry: DesiredEntry, record: PlanRecord) -> Outcome | None:
        """Finish a plan a previous run left unfinished; None when it cannot go on and the key is re-planned."""
        plan = record.plan
        with structlog.contextvars.bound_contextvars(plan_id=plan.id):
            try:
                _, steps = self._tools.validate_plan(plan)
            except PlanValidationError as e:
                record.state, record.message = PlanState.FAILED, f"cannot resume: {e}"
                await self._executor.save(record)
                return None
            current = plan.desired_revision == entry.mod_revision
            if current and record.outcome_unknown_step is not None:
                # Settled as unknown by an earlier attempt whose journal write failed.
                return await self._hold(entry, record, steps[record.outcome_unknown_step - 1])
            for validated in steps:
                journal = record.steps[validated.index]
                if journal.state is StepState.RUNNING and not await self._settle(validated, record, current=current):
                    return await self._hold(entry, record, validated)
            if not current:
                record.state, record.message = PlanState.SUPERSEDED, "desired state changed while setpoint was down"
                for journal in record.steps:
                    if journal.state is StepState.PENDING:
                        journal.state = StepState.SKIPPED
                await self._executor.save(record)
                return None
            remaining = [v for v in steps if record.steps[v.index].state is StepState.PENDING]
            log.info("plan.resuming", steps_left=len(remaining))
            self._flap.record(entry.key)
            await self._write(entry, Phase.EXECUTING, f"resuming after restart: {plan.reasoning}", plan_id=plan.id)
            state, message = await self._execute(entry, record, remaining)
            return await self._after(entry, plan, state, message)

    async def _execute(
        self, entry: DesiredEntry, record: PlanRecord, steps: list[ValidatedStep]
    ) -> tuple[PlanState, str]:
        try:
            execution = await self._executor.execute(
                record, steps, current_revision=lambda: self._revision(entry.key)
            )
        except Exception:
            # A journal write failed mid-plan (etcd down): the in-memory journal is the
            # truth, so the retry resumes from it and never re-plans a step that may have run.
            self._resume[entry.key] = record
            raise
        return execution.state, execution.message

    async def _settle(self, validated: ValidatedStep, record: PlanRecord, *, current: bool) -> bool:
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
        return not current  # a moved desired value is re-planned by the operator's choice, not held

    async def _hold(self, entry: DesiredEntry, record: PlanRecord, validated: ValidatedStep) -> Outcome:
        step = validated.index + 1
        message = (
            f"step {step} outcome unknown: setpoint stopped while {validated.tool.name} ran, and that tool is "
            f"neither idempotent nor verifiable; check by hand, then change the desired value to go on"
        )
        record.state, record.message = PlanState.FAILED, message
        for journal in record.steps:
            if journal.state is StepState.PENDING:
                journal.state = StepState.SKIPPED
        await self._executor.save(record)
        await self._write(entry, Phase.FAILED, message, plan_id=record.plan.id)
        self._held[entry.key] = entry.mod_revision
        log.error("plan.outcome_unknown", step=step, tool=validated.tool.name)
        return Outcome("outcome_unknown")

    async def _held_by_limits(self, entry: DesiredEntry, plan: ExecutionPlan) -> Outcome | None:
        """Blocked (with a time to look again) if the flap guard or the max-unhealthy pause holds the plan."""
        key = entry.key
        wait = self._flap.blocked_for(key)
        if wait is not None:
            self._metrics.flap_guard_blocked.labels(kind=key.kind).inc()
            await self._write(entry, Phase.BLOCKED, self._flap.reason(key))
            if self._status.changed:
                log.warning("plan.flap_guard", retry_in=round(wait, 1))
            return Outcome("flap_guard", requeue_after=wait + 0.1)
        if entry.deleted or await self._status.applied(key) != entry.resource:
            return None  # applying a new desired value (or removing), not healing drift
        healing = self._observer.drifted(key.kind) | {key}
        total = sum(1 for e in self._cache.desired.values() if e.key.kind == key.kind and e.valid and not e.deleted)
        reason = healing_paused(
            kind=key.kind,
            unhealthy=len(healing),
            total=total,
            max_fraction=self._limits.max_unhealthy_fraction,
            min_count=self._limits.max_unhealthy_min_count,
        )
        if reason is None:
            return None
        self._metrics.healing_paused.labels(kind=key.kind).inc()
        await self._write(entry, Phase.BLOCKED, reason)
        if self._status.changed:
            log.warning("plan.healing_paused", unhealthy=len(healing), total=total)
        return Outcome("healing_paused", requeue_after=HEALING_RECHECK_SECONDS)

    async def _after(self, entry: DesiredEntry, plan: ExecutionPlan, state: PlanState, message: str) -> Outcome:
        observed: Observed | None = None
        if entry.resource is not None and not entry.deleted:
            with contextlib.suppress(InvalidResourceError, OSError):
                observed = await self._observer.observe_now(entry.resource)
        if state is PlanState.SUCCEEDED:
            log.info("plan.succeeded")
            if entry.deleted:
                return await self._removed(entry)
            self._observer.mark_converged(entry.key, observed.state if observed is not None else None)
            await self._write(entry, Phase.CONVERGED, plan.reasoning, plan_id=plan.id, applied=entry.resource)
            return Outcome("converged")
        if state is PlanState.SUPERSEDED:
            return Outcome("superseded", requeue_after=0)
        if state is PlanState.INTERRUPTED:
            await self._write(entry, Phase.PENDING, f"interrupted by shutdown: {message}", plan_id=plan.id)
            return Outcome("interrupted")
        await self._write(entry, Phase.FAILED, message, plan_id=plan.id)
        raise TemporaryError(message)

    async def _removed(self, entry: DesiredEntry) -> Outcome:
        """The deleted resource is torn down: forget it, with the status and observation setpoint wrote for it."""
        await self._status.delete(entry.key)
        if self._observer.observing_agent(entry.key.kind) is not None:
            await self._observer.forget(entry.key)
        self._cache.forget_tombstone(entry.key, entry.mod_revision)
        log.info("resource.removed")
        return Outcome("removed")

    def _revision(self, key: ResourceKey) -> int | None:
        entry = self._cache.desired.get(key)
        return entry.mod_revision if entry is not None else None

    async def _invalid(self, entry: DesiredEntry, message: str) -> None:
        await self._write(entry, Phase.INVALID, message)
        if self._status.changed:  # once per new reason, not on every resync
            log.warning("resource.invalid", reason=message[:500])

    async def _write(
        self,
        entry: DesiredEntry,
        phase: Phase,
        message: str,
        *,
        plan_id: str | None = None,
        applied: Resource | None = None,
    ) -> None:
        await self._status.write(
            entry.key,
            phase=phase,
            desired_revision=entry.mod_revision,
            message=message,
            plan_id=plan_id,
            guard_revision=0 if entry.deleted else entry.mod_revision,
            applied=applied,
        )
