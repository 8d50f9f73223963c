"""The observer against a real etcd: what it writes under actual/ is never older than what a plan saw."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from pydantic import JsonValue

from agents import AgentRegistry
from plans import ExecutionPlan, Resource, ResourceKey
from reconciler.cache import Cache, DesiredEntry
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace, Section
from reconciler.observer import Observer
from reconciler.store import MAX_TXN_OPS, EtcdStore, Fence
from tools import Tool


class Probe:
    """An observing agent whose world is a dict; observing a key in `hold` waits for `release`."""

    name = "probe"
    kinds = frozenset({"probe"})

    def __init__(self) -> None:
        self.world: dict[str, str] = {}
        self.hold: set[str] = set()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def observe(self, desired: Resource) -> dict[str, JsonValue]:
        seen = self.world[desired.name]  # what the world looks like when the observation is taken
        if desired.name in self.hold:
            self.holding.set()
            await self.release.wait()
        return {"v": seen}

    def tools(self) -> Sequence[Tool]:
        return []

    async def reconcile(self, *args: object, **kwargs: object) -> ExecutionPlan:  # never planned here
        raise AssertionError("not used")

    retire = heal = plan = reconcile


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _resource(name: str) -> Resource:
    return Resource(kind="probe", name=name, spec={})


async def test_an_observation_taken_before_a_plan_ran_is_not_written_after_it(store: EtcdStore) -> None:
    keys = KeySpace(f"/obs-{uuid.uuid4().hex[:8]}")
    cache = Cache(keys)
    for i, name in enumerate(("x", "y"), start=1):
        key = ResourceKey(kind="probe", name=name)
        cache.desired[key] = DesiredEntry(key=key, mod_revision=i, resource=_resource(name))
    probe = Probe()
    probe.world = {"x": "old", "y": "steady"}
    probe.hold = {"y"}  # the poll pass observes x, then stalls on y
    agents = AgentRegistry([probe])
    observer = Observer(store=store, keys=keys, cache=cache, agents=agents, poll_seconds={"probe": 3600})
    x = ResourceKey(kind="probe", name="x")
    poller = asyncio.create_task(observer.run())
    try:
        await asyncio.wait_for(probe.holding.wait(), 5)  # the pass has seen x as "old"

        probe.world["x"] = "new"  # a plan changes x...
        probe.hold = set()
        observed = await observer.observe(_resource("x"))  # ...and the runner observes the result
        assert observed is not None
        await observer.record(observed)
        observer.mark_converged(x, {"v": "new"})
        probe.release.set()  # the stalled pass finishes
        await asyncio.sleep(0.3)

        kv = await store.get(keys.actual(x))
        assert kv is not None
        assert json.loads(kv.value)["state"] == {"v": "new"}, "the pass wrote back what it saw before the plan"
        assert x not in observer.drifted("probe"), "the stale observation marked x drifted"
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)


async def test_a_poll_pass_writes_every_observation_under_the_fence_however_many_there_are(
    store: EtcdStore,
) -> None:
    """The pass writes in transactions of many puts, each nested inside the fence's transaction, which takes one of
    the operations etcd allows a transaction: more resources than that must still all be written."""
    keys = KeySpace(f"/obs-{uuid.uuid4().hex[:8]}")
    await store.put(keys.leader(), b"me")
    leader = await store.get(keys.leader())
    assert leader is not None
    fence = Fence(keys.leader(), leader.create_revision)
    cache = Cache(keys)
    probe = Probe()
    names = [f"r{i:03d}" for i in range(MAX_TXN_OPS * 2 + 5)]
    for i, name in enumerate(names, start=1):
        key = ResourceKey(kind="probe", name=name)
        cache.desired[key] = DesiredEntry(key=key, mod_revision=i, resource=_resource(name))
        probe.world[name] = f"seen-{name}"
    observer = Observer(
        store=store.fenced(lambda: fence), keys=keys, cache=cache, agents=AgentRegistry([probe]),
        poll_seconds={"probe": 3600},
    )  # fmt: skip

    await observer.poll_all()

    written, _ = await store.get_prefix(keys.section(Section.ACTUAL))
    assert sorted(json.loads(kv.value)["state"]["v"] for kv in written) == sorted(f"seen-{n}" for n in names)


class BatchProbe(Probe):
    """A Probe that can observe many at once; a batch holding a key in `hold` hangs (a dead mount)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    async def observe_many(self, desired: Sequence[Resource]) -> list[dict[str, JsonValue] | Exception]:
        self.batches += 1
        if any(resource.name in self.hold for resource in desired):
            await asyncio.Event().wait()
        return [
            {"v": self.world[r.name]} if r.name != "broken" else RuntimeError("the agent's bug") for r in desired
        ]


async def test_a_pass_observes_a_batching_agent_in_batches_and_one_by_one_when_a_batch_hangs(
    store: EtcdStore,
) -> None:
    """One answer each, in batches: a resource whose observation failed costs only itself; a batch that outlives the
    observation timeout is observed again one resource at a time, each with its own timeout."""
    keys = KeySpace(f"/obs-{uuid.uuid4().hex[:8]}")
    cache = Cache(keys)
    probe = BatchProbe()
    names = ["broken"] + [f"r{i:03d}" for i in range(600)]  # broken's batch answers; r599's hangs
    for i, name in enumerate(names, start=1):
        key = ResourceKey(kind="probe", name=name)
        cache.desired[key] = DesiredEntry(key=key, mod_revision=i, resource=_resource(name))
        probe.world[name] = f"seen-{name}"
    probe.hold = {"r599"}  # its batch hangs; alone, its observation times out
    probe.release.set()  # ...but `observe` of r599 alone would wait for this: let it answer
    observer = Observer(
        store=store, keys=keys, cache=cache, agents=AgentRegistry([probe]), poll_seconds={"probe": 3600}, timeout=0.5,
    )  # fmt: skip

    await observer.poll_all()

    written, _ = await store.get_prefix(keys.section(Section.ACTUAL))
    assert sorted(json.loads(kv.value)["state"]["v"] for kv in written) == sorted(f"seen-{n}" for n in names[1:])
    assert probe.batches < len(names) // 100, "observed in batches, not one call each"


async def test_the_start_up_pass_writes_later_nothing_a_plan_observed_since_and_its_echoes_queue_nothing(
    store: EtcdStore,
) -> None:
    """`poll_all(write_later=True)` knows what drifted at once and writes nothing; `run` writes it first thing,
    leaving out a resource a plan observed meanwhile; the watch's events of those writes change nothing in the
    cache's eyes (every key was queued already)."""
    keys = KeySpace(f"/obs-{uuid.uuid4().hex[:8]}")
    cache = Cache(keys)
    probe = Probe()
    names = [f"r{i:03d}" for i in range(300)]
    for i, name in enumerate(names, start=1):
        key = ResourceKey(kind="probe", name=name)
        cache.desired[key] = DesiredEntry(key=key, mod_revision=i, resource=_resource(name))
        probe.world[name] = f"seen-{name}"
    agents = AgentRegistry([probe])
    observer = Observer(store=store, keys=keys, cache=cache, agents=agents, poll_seconds={"probe": 3600})
    drifting = ResourceKey(kind="probe", name="r007")
    observer.mark_converged(drifting, {"v": "as it was"})

    await observer.poll_all(write_later=True)

    assert observer.drifted("probe") == {drifting}, "what drifted is known before anything is written"
    assert (await store.get_prefix(keys.section(Section.ACTUAL)))[0] == []
    probe.world["r001"] = "after the plan"
    await observer.observe(_resource("r001"))  # a plan's observation, newer than the pass's
    writer = asyncio.create_task(observer.run(wait_first=True))
    try:
        for _ in range(200):
            written, _ = await store.get_prefix(keys.section(Section.ACTUAL))
            if len(written) == len(names) - 1:
                break
            await asyncio.sleep(0.05)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    by_key = {kv.key: kv for kv in written}
    planned = keys.actual(ResourceKey(kind="probe", name="r001")).encode()
    assert planned not in by_key, "written over a plan's observation"
    assert len(by_key) == len(names) - 1
    assert all(cache.apply_put(kv) is None for kv in written), "an echo of the start-up pass queues nothing"
    assert cache.actual[drifting].observed is not None
    assert cache.actual[drifting].observed.state == {"v": "seen-r007"}
