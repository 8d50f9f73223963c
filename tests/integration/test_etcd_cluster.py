"""The store and the reflector against a real 3-member etcd cluster: a member dies, or loses its quorum.

Endpoints are given by host name (`localhost:PORT`), which etcd3aio's own
`ipv4:` target cannot take. Which member the client talks to is read from the
members themselves (their metrics and status), never from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid

import pytest
from cluster import EtcdCluster, wait_for_leader
from harness import eventually

from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import WatchSettings
from reconciler.store import EtcdStore, StoreUnavailableError
from reconciler.watch import Reflector


async def put_confirmed(store: EtcdStore, key: str, value: bytes, unknown: list[int] | None = None) -> int:
    """Put until etcd confirms it, as an operator would. A write whose answer was lost is unknown (it may have
    landed), and the store says so rather than send it again; `unknown` counts those. The revision."""
    while True:
        try:
            return await store.put(key, value)
        except StoreUnavailableError:
            if unknown is not None:
                unknown[0] += 1


def desired(name: str, n: int) -> bytes:
    return json.dumps({"kind": "file", "name": name, "spec": {"path": f"/r/{name}", "content": str(n)}}).encode()


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_unary_calls_carry_on_when_a_member_dies(etcd_cluster: EtcdCluster, role: str) -> None:
    prefix = f"/c-{uuid.uuid4().hex[:8]}/"
    # The default request timeout: a write the dying leader had taken from a follower is lost, and the follower
    # answers "request timed out" only after etcd's own 5 s, then the write is tried again.
    async with EtcdStore(etcd_cluster.host_endpoints, timeout=10) as store:
        for i in range(30):  # every member's channel has served calls
            await store.put(f"{prefix}warm", str(i).encode())
        leader = await wait_for_leader(etcd_cluster)
        victim = leader if role == "leader" else next(m for m in etcd_cluster.members if m is not leader)
        victim.kill()
        killed_at = time.monotonic()
        slowest = 0.0
        unknown = [0]
        for i in range(100):
            started = time.monotonic()
            revision = await put_confirmed(store, f"{prefix}k", str(i).encode(), unknown)
            kv = await store.get(f"{prefix}k")
            slowest = max(slowest, time.monotonic() - started)
            assert kv is not None and kv.value == str(i).encode() and kv.mod_revision == revision
        took = time.monotonic() - killed_at
    print(
        f"\n{role} killed: 100 put+get in {took:.2f} s after the kill, slowest pair {slowest * 1000:.0f} ms;"
        f" writes whose answer was lost: {unknown[0]}"
    )


async def test_a_host_name_etcd3aio_cannot_take_works(etcd_cluster: EtcdCluster) -> None:
    # etcd3aio rewrites the exact text `localhost` to 127.0.0.1 and refuses any other name in its `ipv4:`
    # target; `LocalHost` names the same host for any resolver (names are case-insensitive), but not for it.
    endpoints = [f"LocalHost:{m.client_port}" for m in etcd_cluster.members]
    async with EtcdStore(endpoints, timeout=5) as store:
        revision = await store.put("/named", b"1")
        kv = await store.get("/named")
    assert kv is not None and kv.mod_revision == revision


async def test_a_name_that_does_not_resolve_is_skipped(etcd_cluster: EtcdCluster) -> None:
    endpoints = ["no-such-member.invalid:2379", *etcd_cluster.host_endpoints]
    async with EtcdStore(endpoints, timeout=5) as store:
        for i in range(20):
            await store.put("/unresolved", str(i).encode())
        kv = await store.get("/unresolved")
    assert kv is not None and kv.value == b"19"


async def test_a_client_with_one_attempt_per_call_is_not_sent_to_a_dead_member(etcd_cluster: EtcdCluster) -> None:
    # The CLI tries each request once: right after connecting, its first call must go to a member that is up,
    # not to whichever channel comes first in the list.
    leader = await wait_for_leader(etcd_cluster)
    dead = next(m for m in etcd_cluster.members if m is not leader)  # a follower: no election mixed in
    dead.kill()
    endpoints = [f"localhost:{m.client_port}" for m in (dead, *(m for m in etcd_cluster.members if m is not dead))]
    for _ in range(10):
        async with EtcdStore(endpoints, timeout=5, retry_attempts=1) as store:
            await store.put("/first", b"1")


async def test_the_watch_resumes_on_another_member_from_its_revision(etcd_cluster: EtcdCluster) -> None:
    keys = KeySpace(f"/c-{uuid.uuid4().hex[:8]}")
    metrics = Metrics()
    cache = Cache(keys)
    settings = WatchSettings(backoff_base_seconds=0.05, backoff_max_seconds=0.2)
    written: dict[str, int] = {}
    async with EtcdStore(etcd_cluster.host_endpoints, timeout=5) as store:

        async def write(name: str, n: int) -> None:
            key = keys.desired(ResourceKey(kind="file", name=name))
            written[name] = await put_confirmed(store, key, desired(name, n))

        for i in range(20):
            await write(f"before-{i}", 0)
        reflector = Reflector(
            store=store, keys=keys, cache=cache, on_change=lambda k: None, metrics=metrics, settings=settings
        )
        task = asyncio.create_task(reflector.run())
        try:
            await asyncio.wait_for(reflector.synced.wait(), 10)
            watched = await eventually(lambda: asyncio.to_thread(etcd_cluster.watched), what="a watch stream")
            assert len(watched) == 1
            victim = watched[0]

            writing = True

            async def keep_writing() -> None:
                n = 0
                while writing:
                    await write(f"during-{n % 50}", n)
                    n += 1

            writer = asyncio.create_task(keep_writing())
            await asyncio.sleep(0.2)
            victim.kill()
            killed_at = time.monotonic()
            moved = await eventually(lambda: asyncio.to_thread(etcd_cluster.watched), what="the watch on a member")
            moved_after = time.monotonic() - killed_at
            await asyncio.sleep(0.2)
            writing = False
            await writer

            async def caught_up() -> bool:
                return all(
                    (e := cache.desired.get(ResourceKey(kind="file", name=name))) is not None and e.mod_revision == rev
                    for name, rev in written.items()
                )

            await eventually(caught_up, what="every write in the cache")
            caught_up_after = time.monotonic() - killed_at
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    restarts = _restarts(metrics)
    print(
        f"\nwatch failover: served by another member {moved_after * 1000:.0f} ms after the kill, cache caught up"
        f" after {caught_up_after * 1000:.0f} ms; {len(written)} keys; restarts {restarts}"
    )
    assert moved[0] is not victim
    assert restarts.get("unavailable", 0) >= 1, "the kill broke the watch"
    assert "compacted" not in restarts, "the watch resumed from its revision, without a relist"
    assert cache.revision >= max(written.values())


async def test_a_frozen_member_is_dropped_and_calls_and_the_watch_go_on_elsewhere(etcd_cluster: EtcdCluster) -> None:
    """A SIGSTOPped member keeps its connections open and answers nothing, as a host that vanished would: only
    keepalive pings tell. Every call must still succeed within the default request timeout, and the watch must
    move (the reflector's own stall detection is set far beyond the test)."""
    keys = KeySpace(f"/c-{uuid.uuid4().hex[:8]}")
    metrics = Metrics()
    cache = Cache(keys)
    settings = WatchSettings(
        backoff_base_seconds=0.05, backoff_max_seconds=0.2, progress_seconds=600, stall_seconds=600
    )
    written: dict[str, int] = {}
    async with EtcdStore(etcd_cluster.host_endpoints) as store:
        reflector = Reflector(
            store=store, keys=keys, cache=cache, on_change=lambda k: None, metrics=metrics, settings=settings
        )
        task = asyncio.create_task(reflector.run())
        frozen: int | None = None
        try:
            await asyncio.wait_for(reflector.synced.wait(), 10)
            watched = await eventually(lambda: asyncio.to_thread(etcd_cluster.watched), what="a watch stream")
            victim = watched[0]
            if await wait_for_leader(etcd_cluster) is victim:  # a follower: no election mixed in
                other = next(m for m in etcd_cluster.members if m is not victim)
                await asyncio.to_thread(etcd_cluster.move_leader, other)
            frozen = victim.pid
            assert frozen is not None
            os.kill(frozen, signal.SIGSTOP)
            stopped_at = time.monotonic()
            slowest = 0.0

            async def caller(k: int) -> None:
                nonlocal slowest
                for n in range(20):
                    started = time.monotonic()
                    name = f"frozen-{k}"
                    key = keys.desired(ResourceKey(kind="file", name=name))
                    written[name] = await put_confirmed(store, key, desired(name, n))
                    slowest = max(slowest, time.monotonic() - started)

            await asyncio.gather(*(caller(k) for k in range(8)))

            async def caught_up() -> bool:
                return all(
                    (e := cache.desired.get(ResourceKey(kind="file", name=name))) is not None and e.mod_revision == rev
                    for name, rev in written.items()
                )

            await eventually(caught_up, timeout=30, what="every write in the cache")
            caught_up_after = time.monotonic() - stopped_at
        finally:
            if frozen is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(frozen, signal.SIGCONT)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    print(
        f"\nfrozen member: 160 writes by 8 callers all answered, the slowest in {slowest:.2f} s;"
        f" the watch caught up {caught_up_after:.2f} s after the freeze; restarts {_restarts(metrics)}"
    )
    assert _restarts(metrics).get("unavailable", 0) >= 1, "the watch on the frozen member was dropped"


def _restarts(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for family in metrics.watch_restarts.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }


async def test_a_member_without_quorum_cancels_the_watch_and_refuses_calls_at_once(
    etcd_cluster: EtcdCluster,
) -> None:
    alone, *others = etcd_cluster.members
    async with EtcdStore([alone.endpoint], timeout=30) as store:
        revision = await store.ping()
        # Neither a progress request nor a stall timeout: only etcd's cancellation (hasleader) ends this watch.
        stream = store.watch(b"/quorum/", b"/quorum0", start_revision=revision + 1)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)  # the stream is created and waiting for events
        assert not first.done()
        pids = [m.pid for m in others]
        try:
            for pid in pids:
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="no leader"):
                async with asyncio.timeout(30):  # a watch without hasleader would wait here for ever
                    await first
            cancelled_after = time.monotonic() - stopped_at
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="no leader"):
                await store.get("/quorum/x")
            refused_in = time.monotonic() - started
        finally:
            await stream.aclose()
            for pid in pids:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
    print(
        f"\nno quorum: watch cancelled {cancelled_after * 1000:.0f} ms after the other members stopped,"
        f" a read refused in {refused_in * 1000:.0f} ms (request timeout 30 s)"
    )
