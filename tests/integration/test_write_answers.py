"""A write whose answer is lost may have been applied. etcd reports "request timed out", "leader changed" and a
member dying after the commit as UNAVAILABLE. The store sends it again, but a guarded transaction sent twice
finds its own write and answers "refused", a definite no where the truth is "it landed": then the store says
"unknown" (StoreUnavailableError). A plain put sent twice is harmless."""

from __future__ import annotations

import asyncio
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


async def test_a_guarded_write_whose_answer_is_lost_and_that_is_then_refused_is_unknown(store: EtcdStore) -> None:
    key = f"/answers-{uuid.uuid4().hex[:8]}/k"
    calls = lose_first_answer(store, "Txn")
    with pytest.raises(StoreUnavailableError, match="may have been applied"):
        await store.txn(guard=Guard(key, 0), then=[Put(key, b"v")])
    assert calls == [2]
    kv = await store.get(key)
    assert kv is not None and kv.value == b"v"  # it did land: "refused" would have been a lie


async def test_a_guarded_write_whose_answer_is_lost_and_that_then_holds_is_done_once(store: EtcdStore) -> None:
    # etcd refused the first try before applying it ("no leader"): the second is the only one.
    key = f"/answers-{uuid.uuid4().hex[:8]}/k"
    stub = store._client.kv._stub  # type: ignore[union-attr]
    real, calls = stub.Txn, [0]

    async def refuse_first(request: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="etcdserver: no leader"
            )
        return await real(request, **kwargs)

    stub.Txn = refuse_first
    assert await store.txn(guard=Guard(key, 0), then=[Put(key, b"v")]) is True
    assert calls == [2]


async def test_a_put_whose_answer_is_lost_is_sent_again(store: EtcdStore) -> None:
    key = f"/answers-{uuid.uuid4().hex[:8]}/k"
    calls = lose_first_answer(store, "Put")
    revision = await store.put(key, b"v")
    assert calls == [2]
    kv = await store.get(key)
    assert kv is not None and kv.value == b"v" and kv.mod_revision == revision


async def test_reads_are_still_retried(store: EtcdStore) -> None:
    calls = lose_first_answer(store, "Range")
    assert await store.get(f"/answers-{uuid.uuid4().hex[:8]}/absent") is None
    assert calls == [2]


async def test_the_request_timeout_bounds_a_write_with_its_retries(etcd: EmbeddedEtcd) -> None:
    # `timeout` bounds one request, retries included (as etcd3aio bounds a read's): each try here takes 0.6 of it
    # and then fails, so a second try is cut off and a third never starts.
    async with EtcdStore([etcd.endpoint], timeout=1.0, retry_attempts=3) as store:
        stub = store._client.kv._stub  # type: ignore[union-attr]
        calls = [0]

        async def slow_failure(request: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            await asyncio.sleep(0.6)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="etcdserver: no leader"
            )

        stub.Put = slow_failure
        with pytest.raises(StoreUnavailableError, match="did not answer within 1 s"):
            await store.put(f"/answers-{uuid.uuid4().hex[:8]}/k", b"v")
        assert calls == [2]
