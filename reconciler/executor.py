"""Runs a validated plan's steps in order, journalling each one under `plans/<id>`.

A step is journalled `running` before its tool is called. Its result goes
into the next write: the next step's start, or the plan's outcome, which the
caller settles together with the final status (`runner.py`). So the record
always says how far a plan got, and a step costs one etcd write. The first
write is `begin`, supplied by the caller: it also writes status `Executing`
and is refused when the desired value has moved on, in which case nothing
runs at all.

The in-memory record says `running` only once that write succeeded: if it
fails, the step is put back to `pending`, because its tool was never called.
A retry then runs it; it is not mistaken for a step cut off by a crash.

Before each step the executor stops if shutdown was requested (the running
step is always finished, never abandoned) or if the desired value moved on
since the plan was made (the plan is superseded and the key is planned
again). Exceptions from a tool become failed steps here, at the boundary,
and a step's output is capped so the record always fits in one etcd request.
A plan succeeds only when every one of its steps is journalled `succeeded`.

Leadership. The journal writes go through the fenced store, so a daemon
that no longer leads cannot journal a step `running`, and so cannot start
it: the write raises `LeadershipLostError`, which ends the plan where it
stands (the next leader resumes the record as after a crash). A tool is
called only if `may_act()` says this daemon still leads, asked right before
the call: a daemon frozen between journalling a step and calling its tool
(or before a retry) does not call it when it wakes. A step whose tool is
already running finishes: an effect outside etcd cannot be fenced.

Rollback. Before a mutating step runs, when the plan's policy allows a
rollback and a later step could fail, its tool is asked for the step that
would undo it (the previous
content and mode of a file), and that inverse is journalled with the step,
unless it is larger than MAX_UNDO_BYTES, would let the record outgrow one
etcd request, or holds a secret (the resource is
labelled `setpoint/secret: "true"`, or the redactor finds one in it). When a
step fails after earlier steps succeeded and the policy says `auto`, those
steps are undone newest first, each journalled under `rolled_back` like any
step; if one of them kept no inverse, nothing is undone and the message
says why. The undo is put to the policy as a plan of its own (planner
`rollback:<id>`): denied, nothing is undone; to be approved, it is stored to
wait for a person instead (`rollback.py`). Rollback steps take no mutation
budget and no flap-guard slot: undoing is not held back.

A mutating step (any risk above read_only) takes a slot from the global
mutation budget. When none is free, what is done so far is journalled
first, then the step waits its turn (shutdown interrupts the wait). A tool
error the tool marks `retryable` is retried with jittered exponential backoff
for a bounded number of attempts; a timeout counts as retryable only for an
idempotent tool, since a timed-out call may have taken effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from llm_router.redact import Redactor
from plans import (
    ExecutionPlan,
    PlanRecord,
    PlanState,
    PlanValidationError,
    RiskLevel,
    RollbackMode,
    RollbackStep,
    StepState,
)
from plans.journal import MAX_MESSAGE_CHARS, MAX_UNDO_BYTES, StepRecord, cap_output, utcnow
from policies import Action, Decision
from policies.limits import MutationBudget
from reconciler.gate import MAX_RECORD_BYTES
from reconciler.journal import PlanJournal
from reconciler.metrics import Metrics
from reconciler.rollback import undo_plan
from reconciler.settings import ToolSettings
from reconciler.store import LeadershipLostError
from tools import CannotUndo, ToolContext, ToolRegistry, ToolResult, ValidatedStep

log = structlog.get_logger("setpoint.executor")

Begin = Callable[[PlanRecord], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Execution:
    """How a call to `execute` ended; `record` holds the outcome, not yet written."""

    record: PlanRecord
    begun: bool  # this call wrote the record
    refused: bool = False  # `begin` was refused: the desired value moved on and nothing ran

    @property
    def state(self) -> PlanState:
        return self.record.state

    @property
    def message(self) -> str:
        return self.record.message


class Executor:
    def __init__(
        self,
        *,
        journal: PlanJournal,
        metrics: Metrics,
        budget: MutationBudget,
        stopping: asyncio.Event,
        tools: ToolRegistry,
        redactor: Redactor,
        decide: Callable[[ExecutionPlan, Mapping[str, str]], Decision],
        retries: ToolSettings | None = None,
        may_act: Callable[[], bool] = lambda: True,
    ) -> None:
        """`stopping` is set at shutdown; `tools` run rollback steps; `redactor` finds secrets an inverse must not
        keep; `decide` is the policy's decision on a plan (an undo) for a resource's labels; `retries` defaults
        to `ToolSettings()`; `may_act()` is False once this daemon no longer leads (asked before each tool call,
        with nothing in between). Defaults to always True."""
        self._decide = decide
        self._tools = tools
        self._redactor = redactor
        self._journal = journal
        self._metrics = metrics
        self._budget = budget
        self._stopping = stopping
        self._retries = retries or ToolSettings()
        self._may_act = may_act

    async def execute(
        self,
        record: PlanRecord,
        steps: Sequence[ValidatedStep],
        *,
        begin: Begin,
        current_revision: Callable[[], int | None],
        secret: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Execution:
        """Run `steps` of `record`; `current_revision()` gives the desired key's revision now (None when deleted);
        `secret`: the resource is labelled secret, so no inverse (a previous value) is kept in the journal;
        `labels`: the resource's, for the policy's word on an automatic rollback."""
        begun = False
        for validated in steps:
            stop = self._stop_before(record, current_revision)
            if stop is None and validated.risk > RiskLevel.READ_ONLY and not self._budget.try_acquire():
                if begun:
                    await self._journal.save(record)  # what is done is on record before a wait
                if not await self._take_budget():
                    stop = (PlanState.INTERRUPTED, "stopped by shutdown before this step")
                else:
                    stop = self._stop_before(record, current_revision)  # the wait may have been long
            if stop is not None:
                return self._finish(record, *stop, begun=begun)
            last = validated.index == len(record.steps) - 1  # no step after it can fail and call for its undo
            if record.rollback is not RollbackMode.NEVER and validated.risk > RiskLevel.READ_ONLY and not last:
                await self._keep_inverse(record, validated, secret=secret)  # on record before the step runs
            if not await self._start(record, validated, None if begun else begin):
                return Execution(record=record, begun=False, refused=True)
            begun = True
            journal = record.steps[validated.index]
            if not self._journal_result(journal, validated.tool.name, await self._run(validated, record)):
                message = f"step {validated.index + 1} ({validated.tool.name}): {journal.message}"
                if record.rollback is RollbackMode.AUTO:
                    message = f"{message}; {await self._roll_back(record, labels or {})}"
                return self._finish(record, PlanState.FAILED, message, begun=True)
        if not record.all_succeeded:  # a journal with a failed or unknown step is never a success
            message = record.message or "a step of this plan did not succeed"
            return self._finish(record, PlanState.FAILED, message, begun=begun)
        return self._finish(record, PlanState.SUCCEEDED, "", begun=begun)

    def _stop_before(
        self, record: PlanRecord, current_revision: Callable[[], int | None]
    ) -> tuple[PlanState, str] | None:
        if self._stopping.is_set():
            return PlanState.INTERRUPTED, "stopped by shutdown before this step"
        if current_revision() != record.plan.desired_revision:
            return PlanState.SUPERSEDED, "desired state changed during execution"
        return None

    async def _start(self, record: PlanRecord, validated: ValidatedStep, begin: Begin | None) -> bool:
        """Journal the step `running` (with `begin` for a plan's first write); False if `begin` refused."""
        journal = record.steps[validated.index]
        state = record.state
        journal.state, journal.started_at = StepState.RUNNING, utcnow()
        record.state = PlanState.EXECUTING
        written = False
        try:
            if begin is not None:
                written = await begin(record)
            else:
                await self._journal.save(record)
                written = True
        finally:
            if not written:  # the tool is not called: the record must not say it might have been
                journal.state, journal.started_at = StepState.PENDING, None
                record.state = state
        return written

    async def _keep_inverse(self, record: PlanRecord, validated: ValidatedStep, *, secret: bool) -> None:
        """Ask the step's tool how to undo it, and keep that in its journal entry unless it is too large or holds
        a secret (then `undo_note` says why it cannot be undone)."""
        journal = record.steps[validated.index]
        if journal.undo is not None or journal.undo_note:
            return  # asked before the step first ran (this is a re-run after a crash): that answer stands
        ctx = ToolContext(plan_id=record.plan.id, resource=record.plan.resource, step_index=validated.index)
        try:
            async with asyncio.timeout(validated.tool.timeout_s):
                undo = await validated.tool.inverse(validated.params, ctx)
        except CannotUndo as e:
            journal.undo_note = str(e)[:MAX_MESSAGE_CHARS]
            return
        except Exception as e:  # a tool's bug costs the undo of its step, never the step
            journal.undo_note = f"recording the inverse failed: {type(e).__name__}: {str(e)[:300]}"
            return
        if undo is None:
            return  # the call changes nothing that needs undoing
        size = len(undo.model_dump_json().encode("utf-8"))
        if secret or self._redactor.value(undo.parameters) != undo.parameters:
            journal.undo_note = "the previous value is secret, so it is not kept: this step cannot be undone"
        elif size > MAX_UNDO_BYTES:
            journal.undo_note = f"its inverse ({size} bytes) is larger than the {MAX_UNDO_BYTES} bytes kept"
        else:
            journal.undo = undo
            if record.worst_case_bytes() > MAX_RECORD_BYTES:  # kept only while the record still fits one request
                journal.undo = None
                journal.undo_note = "the journal has no room left for its inverse in this plan's record"

    async def _roll_back(self, record: PlanRecord, labels: Mapping[str, str]) -> str:
        """Undo the steps that succeeded before the one that failed, newest first, each journalled like any step;
        what was done, for the plan's message. Nothing is undone when one of them cannot be, or when the policy
        would not let the undo run on its own: denied, it is not done; to be approved, it waits for a person
        (`rollback.py`)."""
        plan, why = undo_plan(record)
        if plan is None:
            return why
        decision = self._decide(plan, labels)
        if decision.action is Action.DENY:
            return f"not rolled back: the policy denies its undo ({decision.reason})"
        if decision.action is Action.APPROVE:
            record.rollback = RollbackMode.APPROVE  # the runner stores the undo to wait for a person
            return f"not rolled back on its own: the policy wants its undo approved ({decision.reason})"
        undone: list[str] = []
        for index, inverse in record.undo_steps()[0]:
            try:
                validated = self._tools.validate_step(inverse, index=index)
            except PlanValidationError as e:
                return f"rollback stopped, nothing more undone: {e}"
            entry = RollbackStep(
                index=len(record.rolled_back), tool=inverse.tool, step=inverse, undoes=index,
                state=StepState.RUNNING, started_at=utcnow(),
            )  # fmt: skip
            record.rolled_back.append(entry)
            await self._journal.save(record)
            log.warning("step.rolling_back", step=index + 1, tool=entry.tool)
            if not self._journal_result(entry, entry.tool, await self._run(validated, record)):
                did = f" (steps {', '.join(undone)} were undone)" if undone else ""
                return f"rollback failed undoing step {index + 1}: {entry.message}{did}"
            undone.append(str(index + 1))
        return f"rolled back: undid step{'s' if len(undone) > 1 else ''} {', '.join(undone)}"

    def _journal_result(self, journal: StepRecord, tool: str, result: ToolResult) -> bool:
        """Record `result` in the journal entry (written by the next write); True if it succeeded."""
        journal.finished_at = utcnow()
        journal.output, note = cap_output(result.output)
        if not result.ok:
            journal.state = StepState.FAILED
            journal.message = "; ".join(filter(None, [result.error or "failed", note]))[:MAX_MESSAGE_CHARS]
            return False
        journal.state = StepState.SUCCEEDED
        if note:
            journal.message = note
        log.info("step.succeeded", step=journal.index + 1, tool=tool)
        return True

    async def _take_budget(self) -> bool:
        """Wait for a mutation slot; False if shutdown came first."""
        take = asyncio.ensure_future(self._budget.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if take not in done:
            take.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await take
            return False
        waited = take.result()
        if waited > 0:
            self._metrics.mutation_wait.inc(waited)
            log.info("step.waited_for_budget", seconds=round(waited, 3))
        return True

    async def _run(self, validated: ValidatedStep, record: PlanRecord) -> ToolResult:
        """Call the step's tool, retrying what may be retried; the step is counted, and its time (every
        attempt and the waits between them) observed, under its final result. The first try is a plain call:
        the retry machinery is built only for a step that needs another try."""
        started = time.monotonic()
        result = await self._call(validated, record)
        if not result.ok and result.retryable and self._retries.retry_attempts > 1:
            result = await self._retry(validated, record, result)
        labels = {"tool": validated.tool.name, "result": result.status.value}
        self._metrics.steps.labels(**labels).inc()
        self._metrics.step_duration.labels(**labels).observe(time.monotonic() - started)
        return result

    async def _retry(self, validated: ValidatedStep, record: PlanRecord, failed: ToolResult) -> ToolResult:
        """The tries after a first that `failed` and may be retried, up to `retry_attempts` in all, each after a
        random wait of up to base * 2^(tries so far - 1) seconds, capped at the maximum (full jitter)."""
        r = self._retries
        result, attempt = failed, 1
        while not result.ok and result.retryable and attempt < r.retry_attempts:
            self._metrics.tool_retries.labels(tool=validated.tool.name).inc()
            log.warning("step.retrying", tool=validated.tool.name, attempt=attempt, error=result.error)
            ceiling = min(r.retry_backoff_max_seconds, r.retry_backoff_base_seconds * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, ceiling))
            attempt += 1
            result = await self._call(validated, record)
        return result

    async def _call(self, validated: ValidatedStep, record: PlanRecord) -> ToolResult:
        ctx = ToolContext(plan_id=record.plan.id, resource=record.plan.resource, step_index=validated.index)
        tool = validated.tool
        if not self._may_act():
            # Journalled `running` while this daemon led, but it was frozen since, or its retry came too late:
            # another daemon may lead by now and run this very step. The next leader settles it like a crash.
            raise LeadershipLostError(
                f"step {validated.index + 1} ({tool.name}) of plan {record.plan.id} not run: this daemon no longer "
                "leads"
            )
        try:
            async with asyncio.timeout(tool.timeout_s):
                return await tool.execute(validated.params, ctx)
        except TimeoutError:
            return ToolResult.failure(f"timed out after {tool.timeout_s:g} s", retryable=tool.idempotent)
        except Exception as e:  # a tool's bug is that step's failure, not the daemon's
            log.exception("step.crashed", plan_id=record.plan.id, tool=tool.name)
            return ToolResult.failure(f"tool raised {type(e).__name__}: {str(e)[:MAX_MESSAGE_CHARS]}")

    @staticmethod
    def _finish(record: PlanRecord, state: PlanState, message: str, *, begun: bool) -> Execution:
        record.state = state
        record.message = message
        # An interrupted plan is resumed at the next start, so its remaining steps stay pending.
        if state in (PlanState.FAILED, PlanState.SUPERSEDED):
            for journal in record.steps:
                if journal.state is StepState.PENDING:
                    journal.state = StepState.SKIPPED
        return Execution(record=record, begun=begun)
