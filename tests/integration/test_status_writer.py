"""The status writer says what each write did: written, unchanged, or stale (the desired value moved)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from injection import fail_writes

from plans import ExecutionPlan, PlanRecord, Resource, ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.status import Phase, StatusWriter, WriteResult
from reconciler.store import EtcdStore, Guard, StoreUnavailableError

A, B = ResourceKey(kind="file", name="a"), ResourceKey(kind="file", name="b")


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def test_each_write_returns_its_own_result_even_when_writes_interleave(store: EtcdStore) -> None:
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    ra = await store.put(keys.desired(A), b"{}")
    rb = await store.put(keys.desired(B), b"{}")

    assert await writer.write(A, phase=Phase.CONVERGED, revision=ra) is WriteResult.WRITTEN
    assert await writer.write(A, phase=Phase.CONVERGED, revision=ra) is WriteResult.UNCHANGED
    assert await writer.write(B, phase=Phase.CONVERGED, revision=rb) is WriteResult.WRITTEN

    async def a_changes() -> WriteResult:
        result = await writer.write(A, phase=Phase.INVALID, revision=ra, message="bad value")
        await asyncio.sleep(0.05)  # another await before the caller looks at what happened
        return result

    async def b_unchanged() -> WriteResult:
        await asyncio.sleep(0.02)
        return await writer.write(B, phase=Phase.CONVERGED, revision=rb)

    assert await asyncio.gather(a_changes(), b_unchanged()) == [WriteResult.WRITTEN, WriteResult.UNCHANGED]


async def test_a_status_for_a_value_that_moved_on_is_stale_and_not_written(store: EtcdStore) -> None:
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    old = await store.put(keys.desired(A), b"{}")
    await store.put(keys.desired(A), b'{"newer": true}')

    assert await writer.write(A, phase=Phase.CONVERGED, revision=old) is WriteResult.STALE
    assert await store.get(keys.status(A)) is None

    deleted_at = await store.put(keys.desired(B), b"{}") + 1
    await store.delete(keys.desired(B))
    result = await writer.write(B, phase=Phase.BLOCKED, revision=deleted_at, deleted=True, message="held")
    assert result is WriteResult.WRITTEN, "a status about a deletion is current while the key stays deleted"


async def test_after_a_write_whose_answer_was_lost_the_writer_reads_again(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd applied the write but the answer never came: the writer cannot know what is stored,
    so it must read it again rather than trust its memory."""
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    writer.seed([])  # as at start-up: every status is known
    revision = await store.put(keys.desired(A), b"{}")
    assert await writer.write(A, phase=Phase.CONVERGED, revision=revision) is WriteResult.WRITTEN
    fail_writes(monkeypatch, lambda key, value: key == keys.status(A), applied=True)

    with pytest.raises(StoreUnavailableError):
        await writer.write(A, phase=Phase.BLOCKED, revision=revision, message="flap guard: ...")

    assert await writer.is_converged(A, revision) is False, "etcd says Blocked"
    assert await writer.write(A, phase=Phase.CONVERGED, revision=revision) is WriteResult.WRITTEN


async def test_after_a_plan_write_whose_answer_was_lost_its_status_is_read_again(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status that begins a plan goes in the plan's transaction: the same rule holds there."""
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    writer.seed([])
    journal = PlanJournal(store=store, keys=keys, status=writer)
    revision = await store.put(keys.desired(A), b"{}")
    assert await writer.write(A, phase=Phase.CONVERGED, revision=revision) is WriteResult.WRITTEN
    plan = ExecutionPlan(agent="test", resource=A, desired_revision=revision)
    executing = await writer.prepare(A, phase=Phase.EXECUTING, revision=revision, plan_id=plan.id)
    fail_writes(monkeypatch, lambda key, value: key == keys.status(A), applied=True)

    with pytest.raises(StoreUnavailableError):
        await journal.begin(
            PlanRecord.start(plan, decision="auto"), guard=Guard(keys.desired(A), revision), status=executing
        )

    assert await writer.prepare(A, phase=Phase.CONVERGED, revision=revision) is not None, "etcd says Executing"


async def test_after_a_delete_whose_answer_was_lost_the_status_is_read_again(
    store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    writer.seed([])
    resource = Resource(kind="file", name="a", spec={})
    revision = await store.put(keys.desired(A), b"{}")
    await writer.write(A, phase=Phase.CONVERGED, revision=revision, applied=resource)
    await store.delete(keys.desired(A))
    fail_writes(monkeypatch, lambda key, value: key == keys.status(A), applied=True)

    with pytest.raises(StoreUnavailableError):
        await writer.delete(A)

    assert await writer.applied(A) is None, "etcd has no status any more"


async def test_a_new_desired_value_does_not_inherit_the_old_ones_baseline(store: EtcdStore) -> None:
    """The baseline is what the resource looked like at `applied`: a new `applied` without one has none."""
    keys = KeySpace(f"/st-{uuid.uuid4().hex[:8]}")
    writer = StatusWriter(store=store, keys=keys)
    v1, v2 = (Resource(kind="file", name="a", spec={"v": v}) for v in (1, 2))
    r1 = await store.put(keys.desired(A), b"{}")
    await writer.write(A, phase=Phase.CONVERGED, revision=r1, applied=v1, baseline={"sha256": "of v1"})
    r2 = await store.put(keys.desired(A), b"{}")

    update = await writer.prepare(A, phase=Phase.CONVERGED, revision=r2, applied=v2)  # the look afterwards failed

    assert update is not None and update.status.baseline is None
    kept = await writer.prepare(A, phase=Phase.FAILED, revision=r2, message="later")
    assert kept is not None and kept.status.baseline == {"sha256": "of v1"}, "same applied: the baseline stays"
