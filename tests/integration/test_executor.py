"""The executor against a real etcd: journal, retries, timeouts, crashing tools and the mutation budget."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from llm_router.redact import Redactor
from plans import ExecutionPlan, PlanRecord, PlanState, ResourceKey, RiskLevel, Step
from policies import Policies
from policies.limits import MutationBudget
from reconciler.embedded import EmbeddedEtcd
from reconciler.executor import Executor
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import ToolSettings
from reconciler.status import StatusWriter
from reconciler.store import EtcdStore, Guard
from tools import Tool, ToolContext, ToolRegistry, ToolResult


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scripted(Tool):
    """A tool that plays back a script of outcomes: 'ok', 'retryable', 'error', 'raise' or 'hang'."""

    name: ClassVar[str] = "test.scripted"
    description: ClassVar[str] = "scripted outcomes"
    parameters: ClassVar[type[BaseModel]] = NoParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 0.2

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.calls = 0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        self.calls += 1
        outcome = self.script.pop(0) if self.script else "ok"
        if outcome == "retryable":
            return ToolResult.failure("busy, try again", retryable=True)
        if outcome == "error":
            return ToolResult.failure("broken for good")
        if outcome == "raise":
            raise RuntimeError("tool bug")
        if outcome == "hang":
            await asyncio.sleep(10)
        return ToolResult.success(call=self.calls)


class ReadOnly(Scripted):
    name: ClassVar[str] = "test.read"
    risk: ClassVar[RiskLevel] = RiskLevel.READ_ONLY


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept = 0.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


@dataclass
class Rig:
    executor: Executor
    journal: PlanJournal
    keys: KeySpace
    metrics: Metrics


def make(store: EtcdStore, *, per_minute: int = 100, time: FakeTime | None = None) -> Rig:
    time = time or FakeTime()
    keys = KeySpace(f"/x-{uuid.uuid4().hex[:8]}")
    budget = MutationBudget(per_minute=per_minute, now=time.now, sleep=time.sleep)
    retries = ToolSettings(retry_attempts=3, retry_backoff_base_seconds=0.001, retry_backoff_max_seconds=0.01)
    journal = PlanJournal(store=store, keys=keys, status=StatusWriter(store=store, keys=keys))
    metrics = Metrics()
    executor = Executor(
        journal=journal, metrics=metrics, budget=budget, stopping=asyncio.Event(), retries=retries,
        tools=ToolRegistry(), redactor=Redactor(),
        decide=lambda plan, labels: Policies().evaluate(plan, labels=labels, now=datetime.now(UTC)),
    )
    return Rig(executor, journal, keys, metrics)


async def execute(rig: Rig, record: PlanRecord, steps: list, revision: Callable[[], int]) -> PlanRecord:
    """Run the plan as the runner does: begin with a plain write, settle the outcome afterwards."""

    async def begin(r: PlanRecord) -> bool:
        await rig.journal.save(r)
        return True

    execution = await rig.executor.execute(record, steps, begin=begin, current_revision=revision)
    await rig.journal.settle(execution.record, guard=Guard("/nowhere", 0))
    return execution.record


async def run(rig: Rig, *tools: Tool, revision: int = 5) -> PlanRecord:
    registry = ToolRegistry(tools)
    plan = ExecutionPlan(
        agent="test",
        resource=ResourceKey(kind="test", name="t"),
        steps=tuple(Step(tool=t.name) for t in tools),
        desired_revision=5,
    )
    plan, steps = registry.validate_plan(plan)
    return await execute(rig, PlanRecord.start(plan, decision="auto"), steps, lambda: revision)


async def stored(store: EtcdStore, keys: KeySpace, record: PlanRecord) -> dict:
    kv = await store.get(keys.plan(record.plan.id))
    assert kv is not None
    return json.loads(kv.value)


async def test_retryable_errors_are_retried_then_succeed(store: EtcdStore) -> None:
    rig = make(store)
    tool = Scripted(["retryable", "retryable", "ok"])

    record = await run(rig, tool)

    assert tool.calls == 3
    assert record.state is PlanState.SUCCEEDED
    saved = await stored(store, rig.keys, record)
    assert saved["state"] == "succeeded" and saved["steps"][0]["state"] == "succeeded"


async def test_retries_are_bounded_and_the_last_error_is_reported(store: EtcdStore) -> None:
    rig = make(store)
    tool = Scripted(["retryable"] * 10)

    record = await run(rig, tool)

    assert tool.calls == 3
    assert record.state is PlanState.FAILED
    assert "busy, try again" in record.message


async def test_non_retryable_errors_and_tool_crashes_are_not_retried(store: EtcdStore) -> None:
    rig = make(store)
    broken, crashing, never = Scripted(["error"]), Scripted(["raise"]), Scripted([])
    crashing_cls = type("Crashing", (Scripted,), {"name": "test.crashing"})
    never_cls = type("Never", (Scripted,), {"name": "test.never"})
    crashing.__class__, never.__class__ = crashing_cls, never_cls

    first = await run(rig, broken)
    second = await run(rig, crashing, never)

    assert broken.calls == 1 and first.state is PlanState.FAILED
    assert crashing.calls == 1 and "tool raised RuntimeError: tool bug" in second.message
    assert never.calls == 0
    assert [s.state.value for s in second.steps] == ["failed", "skipped"]


async def test_a_timed_out_idempotent_tool_is_retried(store: EtcdStore) -> None:
    rig = make(store)
    tool = Scripted(["hang", "ok"])

    record = await run(rig, tool)

    assert tool.calls == 2
    assert record.state is PlanState.SUCCEEDED


async def test_a_step_is_counted_and_timed_once_under_its_final_result_its_retries_included(
    store: EtcdStore,
) -> None:
    rig = make(store)
    timed_out_then_ok, broken = Scripted(["hang", "ok"]), type("Broken", (Scripted,), {"name": "test.broken"})([])
    broken.script = ["error"]

    await run(rig, timed_out_then_ok)
    await run(rig, broken)

    def sample(name: str, tool: str, result: str) -> float | None:
        value = rig.metrics.registry.get_sample_value(name, {"tool": tool, "result": result})
        return None if value is None else float(value)

    assert sample("setpoint_plan_steps_total", "test.scripted", "success") == 1
    assert sample("setpoint_plan_step_duration_seconds_count", "test.scripted", "success") == 1
    took = sample("setpoint_plan_step_duration_seconds_sum", "test.scripted", "success")
    assert took is not None and took >= Scripted.timeout_s, "the timed-out attempt is part of the step's time"
    assert sample("setpoint_plan_steps_total", "test.broken", "error") == 1
    assert sample("setpoint_plan_step_duration_seconds_count", "test.broken", "error") == 1
    assert sample("setpoint_plan_step_duration_seconds_count", "test.scripted", "error") is None


async def test_only_mutating_steps_take_from_the_budget_and_wait_their_turn(store: EtcdStore) -> None:
    time = FakeTime()
    rig = make(store, per_minute=1, time=time)

    await run(rig, ReadOnly([]))
    await run(rig, ReadOnly([]))
    assert time.slept == 0, "read-only steps never wait for the mutation budget"
    await run(rig, Scripted([]))
    assert time.slept == 0
    record = await run(rig, Scripted([]))

    assert record.state is PlanState.SUCCEEDED
    assert time.slept == pytest.approx(60), "the second mutating step waits for the first one's minute to pass"


async def test_a_moved_desired_revision_supersedes_before_the_next_step(store: EtcdStore) -> None:
    rig = make(store)
    first, second = Scripted([]), type("Second", (Scripted,), {"name": "test.second"})([])
    revisions = iter([5, 6])  # the desired value moves while the first step runs

    registry = ToolRegistry([first, second])
    plan, steps = registry.validate_plan(
        ExecutionPlan(
            agent="test", resource=ResourceKey(kind="test", name="t"),
            steps=(Step(tool=first.name), Step(tool=second.name)), desired_revision=5,
        )
    )  # fmt: skip
    record = await execute(rig, PlanRecord.start(plan, decision="auto"), steps, lambda: next(revisions))

    assert record.state is PlanState.SUPERSEDED
    assert first.calls == 1 and second.calls == 0
    assert [s.state.value for s in record.steps] == ["succeeded", "skipped"]
