"""Runs a validated plan's steps in order and journals each one under `plans/<id>`.

A step is journalled `running` before its tool is called and `succeeded` /
`failed` after, so the record always says how far a plan got. Before each
step the executor stops if shutdown was requested (the running step is
always finished, never abandoned) or if the desired value moved on since the
plan was made (the plan is superseded and the key is planned again).
Exceptions from a tool are turned into failed steps here, at the boundary.

A mutating step (any risk above read_only) first takes a slot from the
global mutation budget, waiting its turn if the budget is spent (shutdown
interrupts the wait). A tool error the tool marks `retryable` is retried
with jittered exponential backoff for a bounded number of attempts; a
timeout counts as retryable only for an idempotent tool, since a timed-out
call may have taken effect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt, wait_random_exponential

from plans import PlanRecord, PlanState, RiskLevel, StepState
from plans.journal import utcnow
from policies.limits import MutationBudget
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import ToolSettings
from reconciler.store import EtcdStore
from tools import ToolContext, ToolResult, ValidatedStep

log = structlog.get_logger("setpoint.executor")

MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class Execution:
    record: PlanRecord

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
        store: EtcdStore,
        keys: KeySpace,
        metrics: Metrics,
        budget: MutationBudget,
        retries: ToolSettings | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._metrics = metrics
        self.budget = budget
        self._retries = retries or ToolSettings()
        self.stopping = asyncio.Event()

    async def save(self, record: PlanRecord) -> None:
        """Write `record` to `plans/<id>` with a fresh `updated_at`."""
        await self._save(record)

    async def _save(self, record: PlanRecord) -> None:
        record.updated_at = utcnow()
        await self._store.put(self._keys.plan(record.plan.id), record.model_dump_json().encode())

    async def execute(
        self,
        record: PlanRecord,
        steps: Sequence[ValidatedStep],
        *,
        current_revision: Callable[[], int | None],
    ) -> Execution:
        """Run `steps`; `current_revision()` gives the desired key's revision now (None when deleted)."""
        plan = record.plan
        record.state = PlanState.EXECUTING
        await self._save(record)
        for validated in steps:
            journal = record.steps[validated.index]
            if self.stopping.is_set():
                return await self._finish(record, PlanState.INTERRUPTED, "stopped by shutdown before this step")
            if current_revision() != plan.desired_revision:
                return await self._finish(record, PlanState.SUPERSEDED, "desired state changed during execution")
            if validated.risk > RiskLevel.READ_ONLY and not await self._take_budget():
                return await self._finish(record, PlanState.INTERRUPTED, "stopped by shutdown before this step")
            journal.state = StepState.RUNNING
            journal.started_at = utcnow()
            await self._save(record)
            result = await self._run(validated, record)
            journal.finished_at = utcnow()
            journal.output = result.output
            self._metrics.steps.labels(tool=validated.tool.name, result=result.status.value).inc()
            if not result.ok:
                journal.state = StepState.FAILED
                journal.message = (result.error or "failed")[:MAX_MESSAGE_CHARS]
                for later in record.steps[validated.index + 1:]:
                    later.state = StepState.SKIPPED
                return await self._finish(
                    record, PlanState.FAILED, f"step {validated.index + 1} ({validated.tool.name}): {journal.message}"
                )
            journal.state = StepState.SUCCEEDED
            log.info("step.succeeded", plan_id=plan.id, step=validated.index + 1, tool=validated.tool.name)
        return await self._finish(record, PlanState.SUCCEEDED, "")

    async def _take_budget(self) -> bool:
        """Wait for a mutation slot; False if shutdown came first."""
        take = asyncio.ensure_future(self.budget.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
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
        r = self._retries

        def log_retry(state: RetryCallState) -> None:
            self._metrics.tool_retries.labels(tool=validated.tool.name).inc()
            result = state.outcome.result() if state.outcome is not None else None
            log.warning(
                "step.retrying", tool=validated.tool.name, attempt=state.attempt_number,
                error=result.error if isinstance(result, ToolResult) else None,
            )  # fmt: skip

        retrying = AsyncRetrying(
            stop=stop_after_attempt(r.retry_attempts),
            wait=wait_random_exponential(multiplier=r.retry_backoff_base_seconds, max=r.retry_backoff_max_seconds),
            retry=retry_if_result(lambda result: not result.ok and result.retryable),
            before_sleep=log_retry,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome is not None else None,
        )
        result: ToolResult = await retrying(self._call, validated, record)
        return result

    async def _call(self, validated: ValidatedStep, record: PlanRecord) -> ToolResult:
        ctx = ToolContext(plan_id=record.plan.id, resource=record.plan.resource, step_index=validated.index)
        tool = validated.tool
        try:
            async with asyncio.timeout(tool.timeout_s):
                return await tool.execute(validated.params, ctx)
        except TimeoutError:
            return ToolResult.failure(f"timed out after {tool.timeout_s:g} s", retryable=tool.idempotent)
        except Exception as e:  # a tool's bug is that step's failure, not the daemon's
            log.exception("step.crashed", plan_id=record.plan.id, tool=tool.name)
            return ToolResult.failure(f"tool raised {type(e).__name__}: {str(e)[:MAX_MESSAGE_CHARS]}")

    async def _finish(self, record: PlanRecord, state: PlanState, message: str) -> Execution:
        record.state = state
        record.message = message
        # An interrupted plan is resumed at the next start, so its remaining steps stay pending.
        if state in (PlanState.FAILED, PlanState.SUPERSEDED):
            for journal in record.steps:
                if journal.state is StepState.PENDING:
                    journal.state = StepState.SKIPPED
        await self._save(record)
        return Execution(record=record)
