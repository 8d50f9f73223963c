"""The reflector against a real etcd: list, watch, and relist after compaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from harness import eventually

from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.store import EtcdStore, WatchCompactedError
from reconciler.watch import Reflector


def desired(name: str, content: str = "x") -> bytes:
    return json.dumps({"kind": "file", "name": name, "spec": {"path": f"/r/{name}", "content": content}}).encode()


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def test_watch_from_a_compacted_revision_raises_instead_of_resuming(store: EtcdStore) -> None:
    prefix = f"/w-{uuid.uuid4().hex[:8]}/"
    first = await store.put(prefix + "a", b"1")
    head = await store.put(prefix + "a", b"2")
    await store.compact(head)

    with pytest.raises(WatchCompactedError) as raised:
        async for _ in store.watch(prefix.encode(), prefix.encode() + b"\xff", start_revision=first):
            pass

    assert raised.value.compact_revision >= head


async def test_reflector_relists_after_compaction_and_synthesises_deletes(store: EtcdStore) -> None:
    keys = KeySpace(f"/w-{uuid.uuid4().hex[:8]}")
    key = lambda name: ResourceKey(kind="file", name=name)  # noqa: E731
    for name in ("stays", "goes", "changes"):
        await store.put(keys.desired(key(name)), desired(name))
    cache = Cache(keys)
    metrics = Metrics()
    seen: list[ResourceKey] = []
    reflector = Reflector(store=store, keys=keys, cache=cache, on_change=seen.append, metrics=metrics)

    task = asyncio.create_task(reflector.run())
    await asyncio.wait_for(reflector.synced.wait(), 10)
    assert set(cache.desired) == {key("stays"), key("goes"), key("changes")}
    task.cancel()  # the watch is down: what happens now is only visible after the gap
    with contextlib.suppress(asyncio.CancelledError):
        await task

    await store.delete(keys.desired(key("goes")))
    changed_at = await store.put(keys.desired(key("changes")), desired("changes", "new"))
    created_at = await store.put(keys.desired(key("new")), desired("new"))
    await store.compact(created_at)
    seen.clear()

    task = asyncio.create_task(reflector.run())
    try:

        async def relisted() -> bool:
            return metrics.watch_restarts.labels(reason="compacted")._value.get() == 1 and key("new") in cache.desired

        await eventually(relisted, what="relist after compaction")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    goes = cache.desired[key("goes")]
    assert goes.deleted and goes.resource is not None, "vanished key must become a tombstone"
    assert cache.desired[key("changes")].mod_revision == changed_at
    assert cache.desired[key("changes")].resource.spec["content"] == "new"  # type: ignore[union-attr]
    assert cache.desired[key("stays")].deleted is False
    assert {key("goes"), key("changes"), key("new")} <= set(seen)
    assert cache.revision >= created_at
