"""gc.disable/gc.freeze (`heap.building`) around the list and the start-up observe pass.

gc.freeze() moves every object the collector tracks into the permanent generation, unreachable cycles
included, and the collector never looks there again. With the collector off while the list (or the pass)
runs, every reference cycle that became garbage meanwhile, in any task of the daemon, is still there at
the freeze: it is frozen, and never freed (until gc.unfreeze, which nothing calls). A relist happens after
every compaction or watch failure, so the leak repeats for the daemon's life.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import weakref
from collections.abc import AsyncIterator

import pytest

from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.daemon import _without_gc
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.store import EtcdStore
from reconciler.watch import Reflector


class _Node:
    """A reference cycle, as an exception's traceback, a done task or a future's callbacks make."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def _churn(refs: list[weakref.ref[_Node]], *, times: int) -> None:
    """Another task of the daemon (a worker) making and dropping cycles meanwhile."""
    for _ in range(times):
        node = _Node()
        refs.append(weakref.ref(node))
        del node
        await asyncio.sleep(0)


def _leaked(refs: list[weakref.ref[_Node]]) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


async def test_garbage_cycles_made_while_a_relist_runs_are_still_freed(store: EtcdStore) -> None:
    keys = KeySpace(f"/gc-{uuid.uuid4().hex[:8]}")
    await store.put(keys.desired(ResourceKey(kind="file", name="a")), b'{"kind":"file","name":"a","spec":{}}')
    reflector = Reflector(store=store, keys=keys, cache=Cache(keys), on_change=lambda key: None, metrics=Metrics())
    refs: list[weakref.ref[_Node]] = []
    assert gc.isenabled()
    try:
        await asyncio.gather(reflector._relist(), _churn(refs, times=20))
        assert gc.isenabled()
        assert _leaked(refs) == 0, f"{_leaked(refs)} of {len(refs)} garbage cycles survive gc.collect() (frozen)"
    finally:
        gc.unfreeze()


async def test_garbage_cycles_made_during_the_start_up_observe_pass_are_still_freed() -> None:
    refs: list[weakref.ref[_Node]] = []
    try:
        await _without_gc(_churn(refs, times=20))  # the pass itself: a failed observation's traceback, say
        assert _leaked(refs) == 0, f"{_leaked(refs)} of {len(refs)} garbage cycles survive gc.collect() (frozen)"
    finally:
        gc.unfreeze()
