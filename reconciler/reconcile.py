"""One reconcile of one key: take a snapshot, choose the path, then plan, gate and run.

A reconcile request is only a key; everything is read again from the cache,
so coalesced events and resyncs are handled the same way. The path, in order:

1. no desired value and nothing to tear down: remove any status left (`absent`);
2. a value that cannot be read, or a kind no agent owns: `Invalid`, with the reason;
3. held after a step's outcome became unknown, until the value changes (`held`);
4. a plan left unfinished (a crash, a failed journal write): finish it (`resume.py`);
5. a resource claiming a target that another live resource claims too:
   `Invalid`, naming the other. It comes after 3 and 4: a hold, and a plan
   already half done, are settled for the value they were about first;
6. a deleted resource whose target a live resource now claims: forgotten
   without teardown, which would destroy what the live one wants;
7. otherwise: observe, let the agent plan from the snapshot (`reconcile`, or
   `retire` for a deleted resource), and act on the gate's verdict: run the
   plan (`runner.py`), or say in the status why it does not run. The
   observation is written to `actual/` when it changed, unless a plan runs:
   then what the plan leaves behind is written instead, with its outcome.
"""

from __future__ import annotations

import structlog

from agents import AgentRegistry
from plans import InvalidResourceError, Observed, PlanValidationError, ResourceKey, Snapshot
from reconciler.cache import Cache, DesiredEntry
from reconciler.claims import ClaimIndex
from reconciler.gate import Check, Gate, Verdict
from reconciler.observer import Observer
from reconciler.outcome import Outcome, Result
from reconciler.resume import Resumer, Unfinished
from reconciler.runner import Runner
from reconciler.status import Phase, StatusWriter, WriteResult

log = structlog.get_logger("setpoint.reconcile")

# A plan the gate holds back: the phase it puts the resource in, the outcome, and the log event.
_HELD_BACK = {
    Check.DENIED: (Phase.BLOCKED, Result.BLOCKED, "plan.blocked"),
    Check.NEEDS_APPROVAL: (Phase.BLOCKED, Result.BLOCKED, "plan.blocked"),
    Check.FLAP_GUARD: (Phase.BLOCKED, Result.FLAP_GUARD, "plan.flap_guard"),
    Check.HEALING_PAUSED: (Phase.BLOCKED, Result.HEALING_PAUSED, "plan.healing_paused"),
    Check.BUDGET: (Phase.PENDING, Result.BUDGET, "plan.waiting_for_budget"),
    Check.TOO_LARGE: (Phase.INVALID, Result.INVALID, "resource.invalid"),
}


class Reconciler:
    def __init__(
        self,
        *,
        cache: Cache,
        agents: AgentRegistry,
        claims: ClaimIndex,
        observer: Observer,
        gate: Gate,
        runner: Runner,
        resumer: Resumer,
        unfinished: Unfinished,
        status: StatusWriter,
    ) -> None:
        self._cache = cache
        self._agents = agents
        self._claims = claims
        self._observer = observer
        self._gate = gate
        self._runner = runner
        self._resumer = resumer
        self._unfinished = unfinished
        self._status = status

    async def reconcile(self, key: ResourceKey) -> Outcome:
        outcome = await self._reconcile(key)
        if outcome.result is Result.REMOVED:
            self._claims.update(key)  # its tombstone is gone from the cache, and so are its claims
        return outcome

    async def _reconcile(self, key: ResourceKey) -> Outcome:
        entry = self._cache.desired.get(key)
        # Every log line of this reconcile says which desired revision it acted on.
        structlog.contextvars.bind_contextvars(revision=entry.mod_revision if entry is not None else None)
        if entry is None:
            await self._status.delete(key)  # a status left behind would describe a resource that is gone
            return Outcome(Result.ABSENT)
        if entry.error is not None or entry.resource is None:
            return await self._invalid(entry, entry.error or "value could not be read")
        if self._agents.for_kind(key.kind) is None:
            return await self._invalid(entry, f"no agent handles kind {key.kind!r}")
        if self._unfinished.held(entry):
            return Outcome(Result.HELD)  # the Failed status written when the hold began still says why
        resumed = await self._resumer.resume(entry)
        if resumed is not None:
            return resumed
        rivals = self._rivals(key)
        if rivals is not None:
            return await self._invalid(entry, rivals)
        if entry.deleted and (successor := self._claims.successor(key)) is not None:
            log.info("resource.released", claimed_by=str(successor))
            return await self._runner.remove(entry, None)
        try:
            snapshot, observed = await self._snapshot(entry)
            agent = self._agents.for_kind(key.kind)
            assert agent is not None
            plan = await (agent.retire(snapshot) if entry.deleted else agent.reconcile(snapshot))
        except InvalidResourceError as e:
            return await self._invalid(entry, str(e))
        heals_drift = not entry.deleted and await self._status.applied(key) == entry.resource
        verdict = self._gate.check(plan, key=key, revision=entry.mod_revision, heals_drift=heals_drift)
        if verdict.check is not Check.RUN and observed is not None:
            await self._observer.record(observed)  # a plan that runs records what it leaves instead
        return await self._act(entry, snapshot, verdict)

    def _rivals(self, key: ResourceKey) -> str | None:
        """Why `key` may not act: the other resources that claim one of its targets, if any do."""
        for target, others in self._claims.rivals(key).items():
            names = ", ".join(str(other) for other in others)
            return (
                f"{names} also claim{'s' if len(others) == 1 else ''} {target}: a target can have only one owner, "
                f"so neither is acted on; remove or change one of them"
            )
        return None

    async def _snapshot(self, entry: DesiredEntry) -> tuple[Snapshot, Observed | None]:
        """The snapshot to plan from, and the observation taken for it (None when the agent cannot observe)."""
        assert entry.resource is not None
        observed = await self._observer.observe(entry.resource)
        actual = observed
        if actual is None:
            cached = self._cache.actual.get(entry.key)
            actual = cached.observed if cached is not None else None
        snapshot = Snapshot(desired=entry.resource, revision=entry.mod_revision, deleted=entry.deleted, actual=actual)
        return snapshot, observed

    async def _act(self, entry: DesiredEntry, snapshot: Snapshot, verdict: Verdict) -> Outcome:
        check, plan = verdict.check, verdict.plan
        if check is Check.RUN:
            assert verdict.record is not None
            return await self._runner.run(entry, verdict.record, verdict.steps, message=plan.reasoning, stored=False)
        if check is Check.EMPTY:
            if entry.deleted:
                return await self._runner.remove(entry, None)
            self._observer.mark_converged(entry.key, snapshot.actual.state if snapshot.actual is not None else None)
            if not await self._status.is_converged(entry.key, entry.mod_revision):  # else it says what made it so
                baseline = snapshot.actual.state if snapshot.actual is not None else None
                await self._status.write(
                    entry.key, phase=Phase.CONVERGED, revision=entry.mod_revision, message=plan.reasoning,
                    applied=entry.resource, baseline=baseline,
                )  # fmt: skip
            return Outcome(Result.CONVERGED)
        if check is Check.INVALID_PLAN:
            await self._write(entry, Phase.FAILED, verdict.message)
            raise PlanValidationError(verdict.message)
        phase, result, event = _HELD_BACK[check]
        if await self._write(entry, phase, verdict.message) is WriteResult.WRITTEN:  # once per new reason
            log.warning(event, check=check.value, reason=verdict.message[:500], risk=plan.risk.value)
        return Outcome(result, requeue_after=verdict.retry_after)

    async def _invalid(self, entry: DesiredEntry, message: str) -> Outcome:
        if await self._write(entry, Phase.INVALID, message) is WriteResult.WRITTEN:  # not on every resync
            log.warning("resource.invalid", reason=message[:500])
        return Outcome(Result.INVALID)

    async def _write(self, entry: DesiredEntry, phase: Phase, message: str) -> WriteResult:
        return await self._status.write(
            entry.key, phase=phase, revision=entry.mod_revision, deleted=entry.deleted, message=message
        )
