"""Group commit (`_Batches`): fenced writes queued while a request is out share one request.

Every test queues its writes in one event-loop step (asyncio.gather: each task runs up to `await item.future`
before the drain task first runs), so which writes share a request is decided by `_Batches` alone, with no timing.
Each test states what the code did before group commit (one request per write) and asserts that.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from reconciler.embedded import EmbeddedEtcd
from reconciler.observer import PASS_BATCH
from reconciler.store import EtcdStore, Fence, Guard, Put


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def _lead(store: EtcdStore) -> tuple[EtcdStore, str]:
    prefix = f"/group-commit-{uuid.uuid4().hex[:8]}"
    await store.put(f"{prefix}/leader", b"me")
    kv = await store.get(f"{prefix}/leader")
    assert kv is not None
    fence = Fence(f"{prefix}/leader", kv.create_revision)
    return store.fenced(lambda: fence), prefix


async def test_a_full_poll_pass_batch_and_a_concurrent_write_both_land(store: EtcdStore) -> None:
    """The observer's poll pass writes PASS_BATCH (127) puts per transaction so that, nested under the fence, it
    stays within --max-txn-ops. etcd counts a nested transaction's operations against what its parent leaves
    (128 - parent's ops): in a shared request of n writes, a 127-put transaction is allowed only 128 - n. So a
    pass batch and any worker write made meanwhile are both refused ('too many operations in txn request')."""
    fenced, prefix = await _lead(store)
    observations = [(f"{prefix}/actual/file/f{i}", b"{}") for i in range(PASS_BATCH)]
    results = await asyncio.gather(
        fenced.put_all(observations),  # the poll pass
        fenced.put(f"{prefix}/status/file/other", b"converged"),  # a worker's status write meanwhile
        return_exceptions=True,
    )
    assert not any(isinstance(r, BaseException) for r in results), results


async def test_one_write_etcd_refuses_does_not_fail_its_neighbours(store: EtcdStore) -> None:
    """A transaction etcd refuses as a whole (here: one key put twice) used to fail alone. In a shared request
    etcd refuses the request, and every write in it fails with the same error."""
    fenced, prefix = await _lead(store)
    bad = f"{prefix}/bad"
    results = await asyncio.gather(
        fenced.txn(then=[Put(bad, b"1"), Put(bad, b"2")]),
        fenced.put(f"{prefix}/innocent", b"v"),
        return_exceptions=True,
    )
    assert isinstance(results[0], Exception)  # refused, as it always was
    assert not isinstance(results[1], BaseException), results[1]  # but its neighbour should land


async def test_a_write_queued_later_is_not_overtaken_by_an_earlier_one(store: EtcdStore) -> None:
    """Writes A {a}, B {a, b}, C {b} queued in that order. B cannot share A's request (both put a), so it waits
    for the next; C shares A's, since `_Batches` checks C only against what is *in* the batch, not against B,
    which was left behind. C lands first and B, queued before C, lands after it: b ends with B's older value.
    (Daemon shape: A = settle of X writing actual/X, B = a poll pass batch writing actual/X and actual/Y with the
    pass's older observation of Y, C = settle of Y writing actual/Y after its plan; actual/Y ends stale.)"""
    fenced, prefix = await _lead(store)
    a, b = f"{prefix}/a", f"{prefix}/b"
    rev_a, rev_b, rev_c = await asyncio.gather(
        fenced.put(a, b"A"),
        fenced.put_all([(a, b"B"), (b, b"B")]),
        fenced.put(b, b"C"),
    )
    kv = await store.get(b)
    assert kv is not None
    assert rev_b < rev_c, (rev_a, rev_b, rev_c)  # queued before C, so applied before it
    assert kv.value == b"C"


async def test_guarded_writes_in_one_request_are_still_serializable(store: EtcdStore) -> None:
    """Each write is "still its own guarded transaction". etcd evaluates every nested transaction's comparisons
    against the state before any write of the request is applied, so two transactions whose guards each read
    what the other writes both succeed in one request; one after the other (any order), one of them fails."""
    fenced, prefix = await _lead(store)
    x, y = f"{prefix}/x", f"{prefix}/y"
    rx, ry = await store.put(x, b"0"), await store.put(y, b"0")
    answers = await asyncio.gather(
        fenced.txn(guard=Guard(x, rx), then=[Put(y, b"A")]),
        fenced.txn(guard=Guard(y, ry), then=[Put(x, b"B")]),
    )
    assert answers != [True, True], "write skew: both guarded writes succeeded, each against the other's old value"
