"""The reflector against a real etcd: list, watch, relist after compaction, progress and stalls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from harness import eventually

from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import WatchSettings
from reconciler.store import EtcdStore, WatchBatch, WatchCompactedError, WatchStalledError
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
            return metrics.watch_restarts.labels(reason="compacted")._value.get() == 1 and key("new") in seen

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


async def test_progress_requests_answer_a_quiet_stream_without_moving_its_resume_point(store: EtcdStore) -> None:
    prefix = f"/w-{uuid.uuid4().hex[:8]}/".encode()
    head = await store.ping()
    batches: list[WatchBatch] = []

    async def collect() -> None:
        async for batch in store.watch(
            prefix, prefix + b"\xff", start_revision=head + 1, progress_after=0.1, stall_after=0.5
        ):
            batches.append(batch)

    # Nothing is written under the prefix: only answers to progress requests keep the stream talking.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(collect(), 1.5)

    assert len(batches) >= 5, batches
    assert all(not b.events and not b.progress for b in batches), "a progress answer is not a resume point"


class ChattyEtcd(EmbeddedEtcd):
    """etcd sending its own progress notifications every 100 ms instead of every 10 minutes."""

    def _command(self) -> list[str]:
        return [*super()._command(), "--experimental-watch-progress-notify-interval", "100ms"]


async def test_the_watchers_own_progress_notification_is_a_resume_point(tmp_path: Path) -> None:
    server = ChattyEtcd(tmp_path / "data", fast=True, log_path=tmp_path / "etcd.log")
    server.start()
    try:
        async with EtcdStore([server.endpoint]) as store:
            head = await store.ping()
            stream = store.watch(b"/quiet/", b"/quiet0", start_revision=head + 1)
            elsewhere = await store.put("/elsewhere", b"x")  # moves the head, outside the watched range
            async with contextlib.aclosing(stream):
                batch = await asyncio.wait_for(anext(stream), 5)
    finally:
        server.stop()

    assert batch.progress and not batch.events
    assert batch.revision >= elsewhere


async def test_a_silent_stream_ends_as_stalled(store: EtcdStore) -> None:
    prefix = f"/w-{uuid.uuid4().hex[:8]}/".encode()
    head = await store.ping()
    started = asyncio.get_running_loop().time()

    with pytest.raises(WatchStalledError):
        async for _ in store.watch(prefix, prefix + b"\xff", start_revision=head + 1, stall_after=0.3):
            pass

    assert 0.3 <= asyncio.get_running_loop().time() - started < 2


async def test_the_reflector_keeps_a_quiet_watch_without_stall_restarts(store: EtcdStore) -> None:
    keys = KeySpace(f"/w-{uuid.uuid4().hex[:8]}")
    metrics = Metrics()
    cache = Cache(keys)
    settings = WatchSettings(progress_seconds=0.1, stall_seconds=0.5)
    reflector = Reflector(
        store=store, keys=keys, cache=cache, on_change=lambda key: None, metrics=metrics, settings=settings
    )
    task = asyncio.create_task(reflector.run())
    try:
        await asyncio.wait_for(reflector.synced.wait(), 10)
        await asyncio.sleep(2.0)  # four stall periods of silence, bridged by progress answers
        revision = await store.put(keys.desired(ResourceKey(kind="file", name="late")), desired("late"))
        await eventually(lambda: _has(cache, "late", revision), what="the event after the quiet spell")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert _restarts(metrics) == {}


async def _has(cache: Cache, name: str, revision: int) -> bool:
    entry = cache.desired.get(ResourceKey(kind="file", name=name))
    return entry is not None and entry.mod_revision == revision


def _restarts(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in metrics.watch_restarts.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


@pytest.fixture
def frozen_etcd(tmp_path: Path) -> Iterator[EmbeddedEtcd]:
    """An etcd of this test's own, so it can be SIGSTOPped without freezing every other test."""
    server = EmbeddedEtcd(tmp_path / "data", fast=True, log_path=tmp_path / "etcd.log")
    server.start()
    try:
        yield server
    finally:
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
        server.stop()


async def test_a_frozen_etcd_stalls_the_watch_which_resumes_without_loss_when_it_thaws(
    frozen_etcd: EmbeddedEtcd,
) -> None:
    keys = KeySpace("/frozen")
    key = lambda name: ResourceKey(kind="file", name=name)  # noqa: E731
    metrics = Metrics()
    cache = Cache(keys)
    settings = WatchSettings(
        progress_seconds=0.2, stall_seconds=1.0, backoff_base_seconds=0.05, backoff_max_seconds=0.2
    )
    async with EtcdStore([frozen_etcd.endpoint], timeout=2.0) as store:
        written = {
            f"before-{i}": await store.put(keys.desired(key(f"before-{i}")), desired(f"before-{i}")) for i in range(5)
        }
        reflector = Reflector(
            store=store, keys=keys, cache=cache, on_change=lambda k: None, metrics=metrics, settings=settings
        )
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 10)
            # Written right before the freeze: the watch may or may not have them yet.
            for i in range(20):
                name = f"edge-{i}"
                written[name] = await store.put(keys.desired(key(name)), desired(name))
            assert frozen_etcd.pid is not None
            os.kill(frozen_etcd.pid, signal.SIGSTOP)
            frozen_at = asyncio.get_running_loop().time()

            async def stalled() -> bool:
                return _restarts(metrics).get("stalled", 0) >= 2

            await eventually(stalled, timeout=10, what="two stall restarts while etcd is frozen")
            two_stalls_after = asyncio.get_running_loop().time() - frozen_at
            os.kill(frozen_etcd.pid, signal.SIGCONT)
            thawed_at = asyncio.get_running_loop().time()

            for i in range(20):
                name = f"after-{i}"
                written[name] = await store.put(keys.desired(key(name)), desired(name))

            async def caught_up() -> bool:
                return all(await asyncio.gather(*(_has(cache, n, r) for n, r in written.items())))

            await eventually(caught_up, timeout=10, what="every write before, around and after the freeze")
            caught_up_after = asyncio.get_running_loop().time() - thawed_at
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    print(
        f"\nfrozen etcd: two stall restarts {two_stalls_after:.2f} s after SIGSTOP (stall_seconds 1.0);"
        f" caught up {caught_up_after:.2f} s after SIGCONT; restarts {_restarts(metrics)}"
    )
    assert cache.revision >= max(written.values())
    assert set(_restarts(metrics)) <= {"stalled", "unavailable"}
