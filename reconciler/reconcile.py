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
6. a deleted resource whose target a live resource now claims, or whose
   last value carries the label `setpoint/keep: "true"`: forgotten without
   teardown (the first would destroy what the live one wants);
7. held `Blocked` by a rejected or expired plan, until the value changes or
   a person asks to replan (`approvals.py`);
8. observe; a plan waiting for approval is reviewed rather than planned
   again: it keeps waiting, or is rejected, expires, is voided (then the
   resource is planned afresh), or was approved and runs now;
9. otherwise: let the agent plan from the snapshot (`reconcile`, or
   `retire` for a deleted resource), and act on the gate's verdict: run the
   plan (`runner.py`), store it to wait for approval, or say in the status
   why it does not run. The observation is written to `actual/` when it
   changed, unless a plan runs: then what the plan leaves behind is written
   instead, with its outcome;
10. issues (`issues.py`): drift first. A plan that repairs drift the
   resource had converged from answers the open issues not yet dealt with.
   With no drift, the agent's `heal` is asked about each such issue, oldest
   first; the first plan goes through the same gate and path as any plan,
   and the next issue gets a reconcile of its own. No plan: the issue is
   `unhealable`, with the agent's reason; a planner that was asked and gave
   nothing runnable (`PlanningFailed`: every model's answer was rejected)
   makes it `failed`. The status lists every open issue with what was done
   about it, and a report is healed once;
11. a planner that can say nothing now (`PlanningUnavailable`: the model
   budget is spent, no model answers) leaves the resource `Pending` with
   the reason, and it is tried again when the planner says;
12. an agent that gave up on purpose (`GaveUp`: a process in a crash loop)
   makes the resource `Failed` with its message and reports its issue, in
   one transaction guarded like any status write (the issue only when it is
   not open already); the key is dropped until its inputs change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence

import structlog

from agents import Agent, AgentRegistry, ValidatingAgent
from plans import (
    GaveUp,
    InvalidResourceError,
    Observed,
    PlanningFailed,
    PlanningUnavailable,
    PlanRecord,
    PlanState,
    PlanValidationError,
    ResourceKey,
    Snapshot,
)
from policies import Action
from reconciler.approvals import Approvals, Review
from reconciler.cache import Cache, DesiredEntry, IssueEntry
from reconciler.claims import ClaimIndex
from reconciler.gate import Check, Gate, Verdict, plan_and_check
from reconciler.issues import IssueMark, IssueState, problem_began, ref, unhandled
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.observer import Observer
from reconciler.outcome import Outcome, Result
from reconciler.resume import Resumer, Unfinished
from reconciler.runner import Runner
from reconciler.shadow import Shadows
from reconciler.status import Phase, StatusWriter, WriteResult, guard_for
from reconciler.store import EtcdStore, Guard, Op, Put
from tools import ValidatedStep

log = structlog.get_logger("setpoint.reconcile")

KEEP_LABEL = "setpoint/keep"  # on a deleted resource: stop managing it, leave what it made
NO_RULE = "no rule covers this issue"  # why an issue the agent has no plan for is unhealable, unless it says

_ENDED = (PlanState.SUCCEEDED, PlanState.FAILED, PlanState.SUPERSEDED)

# A plan the gate holds back: the phase it puts the resource in, the outcome, and the log event.
_HELD_BACK = {
    Check.DENIED: (Phase.BLOCKED, Result.BLOCKED, "plan.blocked"),
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
        approvals: Approvals,
        journal: PlanJournal,
        shadows: Shadows,
        store: EtcdStore,
        keys: KeySpace,
    ) -> None:
        self._store = store
        self._keys = keys
        self._cache = cache
        self._shadows = shadows
        self._agents = agents
        self._claims = claims
        self._observer = observer
        self._gate = gate
        self._runner = runner
        self._resumer = resumer
        self._unfinished = unfinished
        self._status = status
        self._approvals = approvals
        self._journal = journal
        # Resources whose last reconcile in this runtime ended Converged: their agent was asked, here and now,
        # about the value and state their status records (see `_still_converged`).
        self._asked: set[ResourceKey] = set()

    async def reconcile(self, key: ResourceKey) -> Outcome:
        outcome = await self._reconcile(key)
        if outcome.result is Result.CONVERGED:
            self._asked.add(key)
        else:
            self._asked.discard(key)
        if outcome.result is Result.REMOVED:
            self._claims.update(key)  # its tombstone is gone from the cache, and so are its claims
        elif outcome.result is not Result.ABSENT:
            # Whichever way it went, the status lists the issues open now (written only when that changed).
            await self._status.mark_issues(key)
        return outcome

    async def _reconcile(self, key: ResourceKey) -> Outcome:
        entry = self._cache.desired.get(key)
        # Every log line of this reconcile says which desired revision it acted on.
        structlog.contextvars.bind_contextvars(revision=entry.mod_revision if entry is not None else None)
        if entry is None:
            await self._approvals.abandon(key, "the resource is gone")
            await self._status.delete(key)  # a status left behind would describe a resource that is gone
            return Outcome(Result.ABSENT)
        if entry.error is not None or entry.resource is None:
            return await self._invalid(entry, entry.error or "value could not be read")
        if self._agents.for_kind(key.kind) is None:
            return await self._invalid(entry, f"no agent handles kind {key.kind!r}")
        if self._unfinished.held(entry):
            return Outcome(Result.HELD)  # the Failed status written when the hold began still says why
        began = await self._approvals.recheck(key)  # an approved plan whose start write failed
        if began is not None:
            self._unfinished.keep(key, began)
        if key in self._unfinished.keys or self._approvals.waiting(key) is not None:
            await self._prepare(entry)
        resumed = await self._resumer.resume(entry)
        if resumed is not None:
            return resumed
        rivals = self._rivals(key)
        if rivals is not None:
            return await self._invalid(entry, rivals)
        if entry.deleted and (successor := self._claims.successor(key)) is not None:
            log.info("resource.released", claimed_by=str(successor))
            await self._approvals.abandon(key, f"{successor} now owns what this resource managed")
            return await self._runner.remove(entry, None)
        if entry.deleted and entry.resource.labels.get(KEEP_LABEL) == "true":
            log.info("resource.released", kept=True)  # `setpoint delete --keep`: forget it, leave what it made
            await self._approvals.abandon(key, "deleted with --keep: what it made stays, unmanaged")
            return await self._runner.remove(entry, None)
        closed = await self._approvals.closed(entry)
        if closed is not None:
            return closed
        try:
            snapshot, observed = await self._snapshot(entry)
            waiting = self._approvals.waiting(key)
            approvers = self._gate.decide(waiting.plan, entry.resource.labels).approvers if waiting else ()
            review = await self._approvals.review(entry, snapshot, approvers)
            if review.outcome is not None or review.approved is not None:
                return await self._reviewed(entry, snapshot, review, observed)
            if waiting is None and observed is not None and await self._still_converged(entry, observed):
                await self._observer.record(observed)
                self._observer.mark_converged(key, observed.state)
                return Outcome(Result.CONVERGED)
            agent = self._agents.for_kind(key.kind)
            assert agent is not None
            heals_drift = not entry.deleted and await self._status.applied(key) == entry.resource
            verdict = await plan_and_check(agent, self._gate, snapshot, heals_drift=heals_drift)
            marks: list[IssueMark] = []
            untouched = await self._unhandled(entry)
            if verdict.check is Check.EMPTY and untouched:
                verdict, marks, untouched = await self._heal(agent, entry, snapshot, untouched, verdict)
            elif heals_drift and untouched:  # repairing the drift answers them
                if verdict.record is not None:
                    verdict.record.answers = [ref(issue) for issue in untouched]
                elif verdict.check in _HELD_BACK:
                    marks = [IssueMark(issue, IssueState.BLOCKED, verdict.message) for issue in untouched]
                untouched = []
        except InvalidResourceError as e:
            return await self._invalid(entry, str(e))
        except PlanningUnavailable as e:  # the planner can say nothing now: when it will be asked again, and why
            await self._write(entry, Phase.PENDING, str(e))
            raise
        except PlanningFailed as e:  # asked, and gave nothing that could run
            await self._write(entry, Phase.FAILED, str(e))
            raise
        except GaveUp as e:
            await self._give_up(entry, e)
            raise
        if verdict.check is not Check.RUN and observed is not None:
            await self._observer.record(observed)  # a plan that runs records what it leaves instead
        outcome = await self._act(entry, snapshot, verdict, marks)
        if untouched and outcome.result is Result.CONVERGED:  # the next open issue, in a reconcile of its own
            return Outcome(outcome.result, requeue_after=0)
        return outcome

    async def _still_converged(self, entry: DesiredEntry, observed: Observed) -> bool:
        """Whether `entry` converged at its current revision, its agent was asked about it in this runtime, no
        issue is open on it, and it still looks exactly as it did when it converged: then the agent, asked
        about this value and this state, already said there is nothing to do, so it is not asked again. A
        resync of a converged resource observes it and plans, validates, serialises and writes nothing."""
        if entry.deleted or entry.key not in self._asked or entry.key in self._cache.issues:
            return False
        return await self._status.converged_as(entry.key, entry.mod_revision) == observed.state

    async def _give_up(self, entry: DesiredEntry, error: GaveUp) -> None:
        """`Failed` with why the agent gave up, and its issue reported unless it is open already: both or none."""
        update = await self._status.prepare(
            entry.key, phase=Phase.FAILED, revision=entry.mod_revision, deleted=entry.deleted, message=str(error)
        )
        ops: list[Op] = [update.put] if update is not None else []
        reported = False
        if error.issue is not None and error.issue_id is not None:
            if not any(issue.id == error.issue_id for issue in self._cache.open_issues(entry.key)):
                value = json.dumps(error.issue.model_dump(mode="json")).encode()
                ops.append(Put(self._keys.issue(entry.key, error.issue_id), value))
                reported = True
        if not ops:
            return
        guard = guard_for(self._keys, entry.key, revision=entry.mod_revision, deleted=entry.deleted)
        try:
            written = await self._store.txn(guard=guard, then=ops)
        except BaseException:
            self._status.unknown(entry.key)
            raise
        if written and update is not None:
            self._status.remember(update)
        if written and reported:
            log.warning("resource.gave_up", reason=str(error)[:500], issue=error.issue_id)

    async def _unhandled(self, entry: DesiredEntry) -> list[IssueEntry]:
        """The open issues of a live resource whose report was not yet dealt with for good, oldest first."""
        if entry.deleted:
            return []  # a resource being torn down is not healed
        return unhandled(await self._status.issue_statuses(entry.key), self._cache.open_issues(entry.key))

    async def _heal(
        self, agent: Agent, entry: DesiredEntry, snapshot: Snapshot, untouched: list[IssueEntry], drift: Verdict
    ) -> tuple[Verdict, list[IssueMark], list[IssueEntry]]:
        """With no drift (`drift` is the empty verdict): ask the agent to heal the open issues in turn, oldest
        first, up to the first one it has a plan for. An issue a plan already answered (it succeeded, and began
        after the problem did: the report came late) is not asked about. Returns the verdict on that plan (on
        none: `drift`), what was found about the issues before it, and the issues left after it."""
        assert entry.resource is not None
        marks: list[IssueMark] = []
        denied: Verdict | None = None  # the first heal the policy denied: the phase says so if nothing runs
        for i, issue in enumerate(untouched):
            with structlog.contextvars.bound_contextvars(issue=issue.id):
                answered = await self._answered_before(entry.key, issue)
                if answered is not None:
                    marks.append(answered)
                    log.info("issue.healed_before_reported", plan_id=answered.plan_id)
                    continue
                try:
                    plan = await agent.heal(issue.issue, snapshot)
                except PlanningFailed as e:  # no plan that could run: the report failed, the next is asked about
                    marks.append(IssueMark(issue, IssueState.FAILED, str(e)))
                    log.warning("issue.heal_failed", reason=str(e)[:500])
                    continue
                except PlanningUnavailable:  # what was found about the issues before it stays found
                    if marks:
                        await self._status.mark_issues(entry.key, marks)
                    raise
                verdict = self._gate.check(
                    plan, key=entry.key, revision=entry.mod_revision, heals_drift=True, labels=entry.resource.labels
                )
                if verdict.check is Check.EMPTY:
                    reason = plan.reasoning or NO_RULE
                    marks.append(IssueMark(issue, IssueState.UNHEALABLE, reason))
                    log.info("issue.unhealable", reason=reason[:500], summary=issue.issue.summary[:200])
                    continue
                if verdict.check in (Check.INVALID_PLAN, Check.TOO_LARGE):  # never runnable: the report failed
                    marks.append(IssueMark(issue, IssueState.FAILED, verdict.message))
                    log.warning("issue.heal_invalid", reason=verdict.message[:500])
                    continue
                log.info("issue.healing", check=verdict.check.value, risk=plan.risk.value, reasoning=plan.reasoning)
            if verdict.record is not None:  # to run, or to wait for approval
                verdict.record.answers = [ref(issue)]
                return verdict, marks, untouched[i + 1 :]
            # Held back: tried again as any plan held back is. A denial is about this plan only: the next
            # issue is asked about; a limit holds back whatever would run now.
            marks.append(IssueMark(issue, IssueState.BLOCKED, verdict.message))
            if verdict.check is not Check.DENIED:
                return verdict, marks, untouched[i + 1 :]
            denied = denied or verdict
        return denied or drift, marks, []

    async def _answered_before(self, key: ResourceKey, issue: IssueEntry) -> IssueMark | None:
        """The last plan run for `key`, as the answer to `issue`, if it succeeded and began after the problem did
        (the poll found the drift first, and the alert about it came after the repair)."""
        since = problem_began(issue.issue)
        plan_id = await self._status.plan_id(key) if since is not None else None
        record = await self._journal.read(plan_id) if plan_id is not None else None
        if since is None or record is None or record.state is not PlanState.SUCCEEDED or record.plan.resource != key:
            return None
        start = record.steps[0].started_at if record.steps else None
        if start is None or start < since:
            return None
        return IssueMark(
            issue, IssueState.HEALED, f"repaired by plan {record.plan.id}, which began after the problem did",
            plan_id=record.plan.id,
        )  # fmt: skip

    async def _reviewed(
        self, entry: DesiredEntry, snapshot: Snapshot, review: Review, observed: Observed | None
    ) -> Outcome:
        """Act on the review of a plan that waited for approval: keep waiting, or run it now it is approved."""
        if review.outcome is not None or review.approved is None:
            if observed is not None:
                await self._observer.record(observed)
            return review.outcome or Outcome(Result.AWAITING_APPROVAL)
        record = review.approved
        assert entry.resource is not None
        verdict = self._gate.check(
            record.plan, key=entry.key, revision=entry.mod_revision, heals_drift=False,
            labels=entry.resource.labels, approved=True,
        )  # fmt: skip
        if verdict.check is not Check.RUN:
            if observed is not None:
                await self._observer.record(observed)
            if verdict.check in (Check.INVALID_PLAN, Check.TOO_LARGE, Check.SHADOW):  # it will never run
                await self._approvals.void(entry.key, record, f"cannot run: {verdict.message}", review.consume)
                if verdict.check is Check.SHADOW:
                    return await self._act(entry, snapshot, verdict)
                # Planned afresh at once: acting on the old plan's verdict would hold the resource Failed for a
                # plan nobody waits for any more (an upgrade renamed its tool, say), until its value changed.
                return Outcome(Result.SUPERSEDED, requeue_after=0)
            return await self._held_back(entry, verdict)
        return await self._run(entry, record, verdict.steps, consume=review.consume)

    async def _run(
        self,
        entry: DesiredEntry,
        record: PlanRecord,
        steps: Sequence[ValidatedStep],
        *,
        consume: tuple[Guard, Op] | None = None,
    ) -> Outcome:
        """Run `record`; an approved one (`consume`) or one under `notify` is announced to the hooks."""
        labels = dict(entry.resource.labels) if entry.resource is not None else {}
        announced = consume is not None or record.decision == Action.NOTIFY.value
        if consume is None and announced:
            self._approvals.announce(record, labels)
        try:
            return await self._runner.run(
                entry, record, steps, message=record.plan.reasoning, stored=False, consume=consume
            )
        except Exception:
            if consume is not None and not record.began:
                # The write that starts it failed: whether etcd applied it is read back before anything else.
                self._unfinished.take(entry.key)
                self._approvals.unknown(entry.key, record.plan.id)
            raise
        finally:
            if record.began and consume is not None:
                self._approvals.started(entry.key, record)
            if record.began and announced and record.state in _ENDED:
                self._approvals.finished(record, labels)

    async def _prepare(self, entry: DesiredEntry) -> None:
        """Let the agent read the value a plan made before now (resumed, or approved after a restart) will run for:
        an agent whose tools act from what it parsed (the process agent's launches) learns it here, not only
        when it plans. An invalid value is reported where it is planned."""
        agent = self._agents.for_kind(entry.key.kind)
        if isinstance(agent, ValidatingAgent) and entry.resource is not None:
            with contextlib.suppress(InvalidResourceError):
                await asyncio.to_thread(agent.validate, entry.resource)

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
        issues = tuple(issue.issue for issue in self._cache.open_issues(entry.key)) if not entry.deleted else ()
        snapshot = Snapshot(
            desired=entry.resource, revision=entry.mod_revision, deleted=entry.deleted, actual=actual, issues=issues
        )
        return snapshot, observed

    async def _act(
        self, entry: DesiredEntry, snapshot: Snapshot, verdict: Verdict, marks: Sequence[IssueMark] = ()
    ) -> Outcome:
        """Act on `verdict`; `marks` say what was found about open issues no plan answers."""
        check, plan = verdict.check, verdict.plan
        if check in (Check.RUN, Check.NEEDS_APPROVAL) and marks:
            await self._status.mark_issues(entry.key, marks)
        if check is Check.RUN:
            assert verdict.record is not None
            return await self._run(entry, verdict.record, verdict.steps)
        if check is Check.NEEDS_APPROVAL:
            assert verdict.record is not None
            return await self._approvals.request(entry, snapshot, verdict.record, verdict.message)
        if check is Check.SHADOW:
            assert verdict.record is not None and verdict.decision is not None
            return await self._shadows.record(entry, verdict.record, verdict.decision.action.value)
        if check is Check.EMPTY:
            if entry.deleted:
                return await self._runner.remove(entry, None)
            self._observer.mark_converged(entry.key, snapshot.actual.state if snapshot.actual is not None else None)
            if await self._status.is_converged(entry.key, entry.mod_revision):  # it says what made it so
                if marks:  # else `reconcile` brings the issue list up to date
                    await self._status.mark_issues(entry.key, marks)
            else:
                baseline = snapshot.actual.state if snapshot.actual is not None else None
                await self._status.write(
                    entry.key, phase=Phase.CONVERGED, revision=entry.mod_revision, message=plan.reasoning,
                    applied=entry.resource, baseline=baseline, marks=marks,
                )  # fmt: skip
            return Outcome(Result.CONVERGED)
        if check is Check.INVALID_PLAN:
            await self._write(entry, Phase.FAILED, verdict.message)
            raise PlanValidationError(verdict.message)
        return await self._held_back(entry, verdict, marks)

    async def _held_back(self, entry: DesiredEntry, verdict: Verdict, marks: Sequence[IssueMark] = ()) -> Outcome:
        check, plan = verdict.check, verdict.plan
        phase, result, event = _HELD_BACK[check]
        if await self._write(entry, phase, verdict.message, marks) is WriteResult.WRITTEN:  # once per new reason
            log.warning(event, check=check.value, reason=verdict.message[:500], risk=plan.risk.value)
        return Outcome(result, requeue_after=verdict.retry_after)

    async def _invalid(self, entry: DesiredEntry, message: str) -> Outcome:
        if await self._write(entry, Phase.INVALID, message) is WriteResult.WRITTEN:  # not on every resync
            log.warning("resource.invalid", reason=message[:500])
        return Outcome(Result.INVALID)

    async def _write(
        self, entry: DesiredEntry, phase: Phase, message: str, marks: Sequence[IssueMark] = ()
    ) -> WriteResult:
        return await self._status.write(
            entry.key, phase=phase, revision=entry.mod_revision, deleted=entry.deleted, message=message, marks=marks
        )
