"""A write whose answer is lost may have been applied: the store says so (StoreUnavailableError) instead of sending
it again. etcd reports "request timed out", "leader changed" and a member dying after the commit as UNAVAILABLE;
a guarded transaction sent twice would then find its own write and answer "refused", a definite no where the
truth is "it landed". clientv3 does not retry mutations either."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from reconciler.embedded import EmbeddedEtcd
from reconciler.store import EtcdStore, Guard, Put, StoreUnavailableError


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint], retry_attempts=3) as s:
        yield s


def lose_first_answer(store: EtcdStore, method: str) -> list[int]:
    """The first `method` call on the KV stub reaches etcd, then fails UNAVAILABLE as if the member died before
    answering; returns the list the number of calls is counted in."""
    stub = store._client.kv._stub  # type: ignore[union-attr]
    real = getattr(stub, method)
    calls = [0]

    async def call(request: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        answer = await real(request, **kwargs)
        if calls[0] == 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="leader changed"
            )
        return answer

    setattr(stub, method, call)
    return calls


async def test_a_guarded_write_whose_answer_is_lost_is_not_sent_again(store: EtcdStore) -> None:
    key = f"/answers-{uuid.uuid4().hex[:8]}/k"
    calls = lose_first_answer(store, "Txn")
    with pytest.raises(StoreUnavailableError):
        await store.txn(guard=Guard(key, 0), then=[Put(key, b"v")])
    assert calls == [1], "the write was sent again after its answer was lost"
    kv = await store.get(key)
    assert kv is not None and kv.value == b"v"  # it did land: "refused" would have been a lie


async def test_a_put_whose_answer_is_lost_is_not_sent_again(store: EtcdStore) -> None:
    key = f"/answers-{uuid.uuid4().hex[:8]}/k"
    calls = lose_first_answer(store, "Put")
    with pytest.raises(StoreUnavailableError):
        await store.put(key, b"v")
    assert calls == [1]


async def test_reads_are_still_retried(store: EtcdStore) -> None:
    calls = lose_first_answer(store, "Range")
    assert await store.get(f"/answers-{uuid.uuid4().hex[:8]}/absent") is None
    assert calls == [2]
