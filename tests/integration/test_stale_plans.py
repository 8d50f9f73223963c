"""A plan made from a cache that lags etcd never starts: the write that begins it is refused.

The watch is a few milliseconds behind etcd. A worker that plans in that
window plans for a desired value that no longer exists; the transaction that
would begin the plan compares the desired revision and refuses, so nothing
runs and nothing is written. The cache is filled by hand here, which is
exactly a watch that has not delivered the latest event yet.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plans import Resource, ResourceKey
from reconciler.assembly import assemble, build
from reconciler.cache import Cache, DesiredEntry
from reconciler.clock import SystemClock
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.outcome import Result
from reconciler.settings import Settings
from reconciler.store import EtcdStore


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _resource(path: Path, content: str) -> Resource:
    return Resource(kind="file", name="x", spec={"path": str(path), "content": content})


@pytest.mark.parametrize("lag", ["re-created", "changed"])
async def test_a_plan_for_a_value_etcd_has_moved_past_runs_nothing(
    store: EtcdStore, tmp_path: Path, lag: str
) -> None:
    settings = Settings.model_validate(
        {"agents": {"file": {"allowed_roots": [str(tmp_path)]}}, "reconciler": {"max_auto_risk": "high"}}
    )
    keys = KeySpace(f"/stale-{uuid.uuid4().hex[:8]}")
    cache = Cache(keys)
    runtime = build(
        settings, parts=assemble(settings), store=store, keys=keys, cache=cache, metrics=Metrics(), clock=SystemClock()
    )
    target = tmp_path / "x"
    target.write_text("what the newest value wants\n")
    key = ResourceKey(kind="file", name="x")
    newest = _resource(target, "what the newest value wants\n")
    revision = await store.put(keys.desired(key), json.dumps(newest.model_dump()).encode())
    if lag == "re-created":  # the cache still holds the deletion: its plan would delete the file
        cache.desired[key] = DesiredEntry(key=key, mod_revision=revision - 1, resource=newest, deleted=True)
    else:  # the cache still holds the previous value: its plan would write the old content
        old = _resource(target, "what an older value wanted\n")
        cache.desired[key] = DesiredEntry(key=key, mod_revision=revision - 1, resource=old)

    outcome = await runtime.reconciler.reconcile(key)

    assert outcome.result is Result.STALE
    assert target.read_text() == "what the newest value wants\n"
    statuses, _ = await store.get_prefix(keys.section(Section.STATUS))
    plans, _ = await store.get_prefix(keys.section(Section.PLANS))
    assert statuses == [] and plans == [], "a refused plan writes nothing"
