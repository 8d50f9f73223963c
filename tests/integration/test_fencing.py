"""Fenced writes against a real etcd: a write of the fenced view lands only while the leader key is the one the
fence names; otherwise it raises LeadershipLostError and changes nothing. And the executor on such a view: a
leadership lost mid-plan ends the plan with nothing more started, the record left for the next leader."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from injection import fail_writes
from pydantic import BaseModel, ConfigDict

from llm_router.redact import Redactor
from plans import ExecutionPlan, PlanRecord, ResourceKey, RiskLevel, Step, StepState
from policies import Policies
from policies.limits import MutationBudget
from reconciler.embedded import EmbeddedEtcd
from reconciler.executor import Executor
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import ToolSettings
from reconciler.status import StatusWriter
from reconciler.store import Delete, EtcdStore, Fence, Guard, LeadershipLostError, Put, StoreUnavailableError
from tools import Tool, ToolContext, ToolRegistry, ToolResult


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


class Leadership:
    """A leader key of this test's own prefix, and the fence of whoever created it last."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.prefix = f"/fence-{uuid.uuid4().hex[:8]}"
        self.key = f"{self.prefix}/leader"
        self.fence: Fence | None = None

    async def win(self) -> Fence:
        await self.store.put(self.key, b"me")
        kv = await self.store.get(self.key)
        assert kv is not None
        self.fence = Fence(self.key, kv.create_revision)
        return self.fence

    async def lose(self) -> None:
        """Another daemon took over: the key was deleted (the lease expired) and created again."""
        await self.store.delete(self.key)
        await self.store.put(self.key, b"someone else")

    async def snapshot(self) -> tuple[dict[bytes, tuple[bytes, int]], int]:
        kvs, revision = await self.store.get_prefix(self.prefix + "/")
        return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}, revision


@pytest.fixture
async def leadership(store: EtcdStore) -> Leadership:
    return Leadership(store)


async def test_fenced_writes_land_while_the_fence_holds(store: EtcdStore, leadership: Leadership) -> None:
    await leadership.win()
    fenced = store.fenced(lambda: leadership.fence)
    a, b = f"{leadership.prefix}/a", f"{leadership.prefix}/b"

    revision = await fenced.put(a, b"1")
    assert (await store.get(a)) is not None and revision == (await store.get(a)).mod_revision  # type: ignore[union-attr]
    assert await fenced.put_all([(a, b"2"), (b, b"2")]) > revision
    assert await fenced.delete(b) is True
    assert await fenced.delete(b) is False
    assert fenced.fence_holds() and store.fence_holds()

    current = await store.get(a)
    assert current is not None and current.value == b"2"
    assert await fenced.txn(guard=Guard(a, current.mod_revision), then=[Put(a, b"3")], otherwise=[Put(b, b"no")])
    assert (await store.get(a)).value == b"3"  # type: ignore[union-attr]

    # The caller's own guard fails: its otherwise branch runs, inside the fence, and the answer says so.
    assert not await fenced.txn(guard=Guard(a, current.mod_revision), then=[Put(a, b"4")], otherwise=[Put(b, b"x")])
    assert (await store.get(a)).value == b"3"  # type: ignore[union-attr]
    assert (await store.get(b)).value == b"x"  # type: ignore[union-attr]
    # Both branches writing the same key, as the journal's settle does, is accepted nested too.
    assert not await fenced.txn(
        guard=Guard(a, 1), then=[Put(a, b"5"), Put(b, b"then")], otherwise=[Put(b, b"else"), Delete(a)]
    )
    assert await store.get(a) is None and (await store.get(b)).value == b"else"  # type: ignore[union-attr]


async def test_after_a_takeover_every_fenced_write_is_refused_and_changes_nothing(
    store: EtcdStore, leadership: Leadership
) -> None:
    old = await leadership.win()
    fenced = store.fenced(lambda: old)  # a leader that does not know it lost: it still believes in its fence
    a = f"{leadership.prefix}/a"
    await fenced.put(a, b"before")
    await leadership.lose()
    before, revision = await leadership.snapshot()

    writes = {
        "put": fenced.put(a, b"after"),
        "delete": fenced.delete(a),
        "put_all": fenced.put_all([(a, b"after"), (f"{leadership.prefix}/b", b"after")]),
        "txn then": fenced.txn(then=[Put(a, b"after")]),
        "txn otherwise": fenced.txn(guard=Guard(a, 1), then=[Put(a, b"then")], otherwise=[Put(a, b"else")]),
    }
    for name, write in writes.items():
        with pytest.raises(LeadershipLostError, match=f"{leadership.key} is no longer the key this daemon created"):
            await write
        assert await leadership.snapshot() == (before, revision), f"{name} changed something"

    # The key recreated by another daemon, even with the same value, is another key: a fence is its create revision.
    await leadership.store.put(leadership.key, b"me")
    with pytest.raises(LeadershipLostError):
        await fenced.put(a, b"after")
    # Reads go on as before.
    assert (await fenced.get(a)).value == b"before"  # type: ignore[union-attr]
    assert [kv.key for kv in (await fenced.get_prefix(leadership.prefix + "/"))[0]] == [
        a.encode(),
        leadership.key.encode(),
    ]


async def test_concurrent_fenced_writes_each_get_their_own_answer_in_fewer_requests(
    store: EtcdStore, leadership: Leadership, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fenced writes made while a request is out share the next one (group commit); each is still its own
    transaction: its guard decides its branch alone, and writes that touch one key never share a request."""
    await leadership.win()
    fenced = store.fenced(lambda: leadership.fence)
    requests: list[int] = []
    send = EtcdStore._send_fenced

    async def counted(self: EtcdStore, fence: Fence, batch: Any, *, timeout: float) -> Any:
        requests.append(len(batch))
        return await send(self, fence, batch, timeout=timeout)

    monkeypatch.setattr(EtcdStore, "_send_fenced", counted)
    guard = f"{leadership.prefix}/guard"
    held = await store.put(guard, b"g")
    shared = f"{leadership.prefix}/shared"

    def write(i: int) -> Awaitable[bool]:
        at = held if i % 2 == 0 else 1  # odd ones' guards fail: their otherwise branch runs
        key = f"{leadership.prefix}/k{i}"
        also = [Put(shared, b"%d" % i)] if i % 4 == 0 else []  # these ten all put one key
        return fenced.txn(guard=Guard(guard, at), then=[Put(key, b"then"), *also], otherwise=[Put(key, b"else")])

    answers = await asyncio.gather(*(write(i) for i in range(40)))

    assert answers == [i % 2 == 0 for i in range(40)]
    for i in range(40):
        assert (await store.get(f"{leadership.prefix}/k{i}")).value == (b"then" if i % 2 == 0 else b"else")  # type: ignore[union-attr]
    # Ten writes put `shared`: no two of them went in one request (etcd refuses one key put twice); the others
    # shared requests.
    assert sum(requests) == 40 and 10 <= len(requests) < 40
    print(f"\n40 fenced writes in {len(requests)} requests: {requests}")
    requests.clear()
    answers = await asyncio.gather(*(fenced.put(f"{leadership.prefix}/p{i}", b"v") for i in range(40)))
    assert len(set(answers)) < 40 and len(requests) < 40  # shared requests: one revision for each
    print(f"40 fenced puts in {len(requests)} requests: {requests}")

    await leadership.lose()
    lost = await asyncio.gather(*(fenced.put(f"{leadership.prefix}/q{i}", b"v") for i in range(10)),
                                return_exceptions=True)  # fmt: skip
    assert all(isinstance(e, LeadershipLostError) for e in lost), lost
    assert await store.get(f"{leadership.prefix}/q0") is None


async def test_without_a_fence_nothing_is_sent(etcd: EmbeddedEtcd) -> None:
    # A store on a port where nothing listens: any request would end in StoreUnavailableError, after retries.
    async with EtcdStore(["127.0.0.1:1"], timeout=5, retry_attempts=1) as dead:
        standby = dead.fenced(lambda: None)
        assert not standby.fence_holds()
        for write in (
            standby.put("/k", b"v"),
            standby.delete("/k"),
            standby.put_all([("/k", b"v")]),
            standby.txn(then=[Put("/k", b"v")]),
        ):
            with pytest.raises(LeadershipLostError, match="does not lead"):
                await write
        with pytest.raises(StoreUnavailableError):
            await dead.put("/k", b"v")  # while the same write, unfenced, does try


async def test_a_fenced_view_shares_the_store_and_fault_injection_reaches_it(
    store: EtcdStore, leadership: Leadership, monkeypatch: pytest.MonkeyPatch
) -> None:
    await leadership.win()
    fenced = store.fenced(lambda: leadership.fence)
    assert fenced._client is store._client
    a = f"{leadership.prefix}/a"
    faults = fail_writes(monkeypatch, lambda key, value: key == a, times=1)
    with pytest.raises(StoreUnavailableError, match="injected"):
        await fenced.txn(then=[Put(a, b"1")])
    assert await fenced.txn(then=[Put(a, b"1")])
    assert faults.failed == [a]


# -- the executor on a fenced journal --------------------------------------------------------------------------------


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counting(Tool):
    name: ClassVar[str] = "test.counting"
    description: ClassVar[str] = "counts its calls; may run a hook first"
    parameters: ClassVar[type[BaseModel]] = NoParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 5.0

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.during: dict[int, Callable[[], Awaitable[None]]] = {}  # step index: what happens while it runs

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        self.calls.append(ctx.step_index)
        hook = self.during.get(ctx.step_index)
        if hook is not None:
            await hook()
        return ToolResult.success()


def _rig(store: EtcdStore, prefix: str, tool: Counting) -> tuple[Executor, PlanJournal, KeySpace]:
    keys = KeySpace(prefix)
    journal = PlanJournal(store=store, keys=keys, status=StatusWriter(store=store, keys=keys))
    executor = Executor(
        journal=journal, metrics=Metrics(), stopping=asyncio.Event(), tools=ToolRegistry([tool]),
        budget=MutationBudget(per_minute=100, now=time.monotonic, sleep=asyncio.sleep), redactor=Redactor(),
        retries=ToolSettings(retry_attempts=1),
        decide=lambda plan, labels: Policies().evaluate(plan, labels=labels, now=datetime.now(UTC)),
        may_act=store.fence_holds,
    )  # fmt: skip
    return executor, journal, keys


def _plan(tool: Counting, steps: int) -> tuple[PlanRecord, list]:  # type: ignore[type-arg]
    plan = ExecutionPlan(
        id=uuid.uuid4().hex[:12], agent="test", resource=ResourceKey(kind="file", name="x"),
        steps=tuple(Step(tool=tool.name, parameters={}, description=f"step {i}", risk=RiskLevel.LOW)
                    for i in range(steps)),
        reasoning="test", desired_revision=1, planner="rules",
    )  # fmt: skip
    registry = ToolRegistry([tool])
    steps_ = [registry.validate_step(step, index=i) for i, step in enumerate(plan.steps)]
    return PlanRecord.start(plan, decision="auto"), steps_


async def _stored(store: EtcdStore, keys: KeySpace, plan_id: str) -> PlanRecord:
    kv = await store.get(keys.plan(plan_id))
    assert kv is not None
    return PlanRecord.model_validate_json(kv.value)


async def test_a_leadership_lost_mid_plan_starts_nothing_more_and_leaves_the_record_to_resume(
    store: EtcdStore, leadership: Leadership
) -> None:
    await leadership.win()
    tool = Counting()
    executor, journal, keys = _rig(store.fenced(lambda: leadership.fence), leadership.prefix, tool)
    tool.during[1] = leadership.lose  # another daemon takes over while step 2 runs
    record, steps = _plan(tool, 3)

    async def begin(r: PlanRecord) -> bool:
        await journal.save(r)
        return True

    with pytest.raises(LeadershipLostError):
        await executor.execute(record, steps, begin=begin, current_revision=lambda: 1)
    assert tool.calls == [0, 1], "step 3 must not start"
    stored = await _stored(store, keys, record.plan.id)
    # As after a crash: the step cut off says running, for the next leader to settle; nothing after it ran.
    assert [s.state for s in stored.steps] == [StepState.SUCCEEDED, StepState.RUNNING, StepState.PENDING]


async def test_a_tool_is_not_called_once_the_fence_is_gone_even_with_its_step_journalled(
    store: EtcdStore, leadership: Leadership
) -> None:
    """A leader frozen right after journalling a step `running` wakes up without the lease: it does not call the
    tool (the next leader may be running that very step)."""
    await leadership.win()
    holds = {"fence": True}
    tool = Counting()
    fenced = store.fenced(lambda: leadership.fence if holds["fence"] else None)
    executor, journal, keys = _rig(fenced, leadership.prefix, tool)
    record, steps = _plan(tool, 2)

    async def begin(r: PlanRecord) -> bool:
        await journal.save(r)
        holds["fence"] = False  # the renew deadline passed while the process was frozen, right after the write
        return True

    with pytest.raises(LeadershipLostError, match=r"step 1 .* not run: this daemon no longer leads"):
        await executor.execute(record, steps, begin=begin, current_revision=lambda: 1)
    assert tool.calls == []
    stored = await _stored(store, keys, record.plan.id)
    assert [s.state for s in stored.steps] == [StepState.RUNNING, StepState.PENDING]
