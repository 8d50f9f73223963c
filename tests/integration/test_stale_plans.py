"""A plan made from a cache that lags etcd never starts: the write that begins it is refused.

The watch is a few milliseconds behind etcd. A worker that plans in that
window plans for a desired value that no longer exists; the transaction that
would begin the plan compares the desired revision and refuses, so nothing
runs and nothing is written. The cache is filled by hand here, which is
exactly a watch that has not delivered the latest event yet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import DELETES_RUN
from pipeline import pipeline

from reconciler.cache import DesiredEntry
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import Section
from reconciler.outcome import Result
from reconciler.store import EtcdStore


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


@pytest.mark.parametrize("lag", ["re-created", "changed"])
async def test_a_plan_for_a_value_etcd_has_moved_past_runs_nothing(
    store: EtcdStore, tmp_path: Path, lag: str
) -> None:
    p = pipeline(store, tmp_path, policies=DELETES_RUN)  # deletes run
    (tmp_path / "x").write_text("what the newest value wants\n")
    newest = p.file("x", "what the newest value wants\n")
    revision = await p.put(newest, cached=False)
    if lag == "re-created":  # the cache still holds the deletion: its plan would delete the file
        p.cache.desired[newest.key] = DesiredEntry(
            key=newest.key, mod_revision=revision - 1, resource=newest, deleted=True
        )
    else:  # the cache still holds the previous value: its plan would write the old content
        old = p.file("x", "what an older value wanted\n")
        p.cache.desired[newest.key] = DesiredEntry(key=newest.key, mod_revision=revision - 1, resource=old)

    outcome = await p.runtime.reconciler.reconcile(newest.key)

    assert outcome.result is Result.STALE
    assert (tmp_path / "x").read_text() == "what the newest value wants\n"
    statuses, _ = await store.get_prefix(p.keys.section(Section.STATUS))
    plans, _ = await store.get_prefix(p.keys.section(Section.PLANS))
    assert statuses == [] and plans == [], "a refused plan writes nothing"
