"""The worker loop: take a key, reconcile it from the cache, and handle the outcome in one place.

A reconcile request is only a key; the worker re-reads desired and actual
from the cache, so coalesced events and resyncs are handled the same way.
`reconcile` returns an `Outcome` or raises; `_handle` is the one outcome
switch: success forgets the key's backoff, a `TemporaryError` (or any
unexpected exception) requeues it with per-key backoff, a `PermanentError`
drops it until its inputs change, and `requeue_after` re-adds it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

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
    TemporaryError,
)
from policies import Action, PolicySet
from reconciler.cache import Cache, DesiredEntry
from reconciler.executor import Executor
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.status import Phase, StatusWriter
from reconciler.workqueue import ShutDownError, WorkQueue
from tools import ToolRegistry

log = structlog.get_logger("setpoint.controller")


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
        self._workers: list[asyncio.Task[None]] = []

    # -- lifecycle --------------------------------------------------------------

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
        return await self._gate_and_run(entry, plan)

    async def _actual(self, entry: DesiredEntry) -> Observed | None:
        assert entry.resource is not None
        observed = await self._observer.observe_now(entry.resource)
        if observed is not None:
            return observed
        cached = self._cache.actual.get(entry.key)
        return cached.observed if cached is not None else None

    async def _gate_and_run(self, entry: DesiredEntry, plan: ExecutionPlan) -> Outcome:
        key = entry.key
        try:
            plan, steps = self._tools.validate_plan(plan)
        except PlanValidationError as e:
            await self._write(entry, Phase.FAILED, f"agent {plan.agent} made an invalid plan: {e}")
            raise
        if plan.is_empty:
            if entry.deleted:
                return await self._removed(entry)
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
        with structlog.contextvars.bound_contextvars(plan_id=plan.id):
            await self._write(entry, Phase.EXECUTING, plan.reasoning, plan_id=plan.id)
            log.info("plan.executing", steps=len(steps), risk=plan.risk.value, reasoning=plan.reasoning)
            execution = await self._executor.execute(record, steps, current_revision=lambda: self._revision(key))
            return await self._after(entry, plan, execution.state, execution.message)

    async def _after(self, entry: DesiredEntry, plan: ExecutionPlan, state: PlanState, message: str) -> Outcome:
        if entry.resource is not None and not entry.deleted:
            with contextlib.suppress(InvalidResourceError, OSError):
                await self._observer.observe_now(entry.resource)
        if state is PlanState.SUCCEEDED:
            log.info("plan.succeeded")
            if entry.deleted:
                return await self._removed(entry)
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
            log.warning("resource.invalid", reason=message)

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
