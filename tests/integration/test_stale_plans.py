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
from typing import Any

import pytest
from harness import DELETES_RUN
from pipeline import pipeline

from reconciler.cache import DesiredEntry
from reconciler.embedded import EmbeddedEtcd
from reconciler.journal import PlanJournal
from reconciler.keys import Section
from reconciler.outcome import Result
from reconciler.runner import STALE_RECHECK_SECONDS
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


async def test_a_stale_plan_is_looked_at_again_only_if_the_watch_has_not_brought_the_change_yet(
    store: EtcdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change that made a plan stale queues its key when the watch brings it. Until then the runner asks
    for a recheck; once the cache holds it, a recheck would only be one more reconcile of a key already queued
    (with writes coming fast, one more per change)."""
    p = pipeline(store, tmp_path)
    newest = p.file("x", "newest\n")
    revision = await p.put(newest, cached=False)
    old = p.file("x", "older\n")
    lagging = DesiredEntry(key=newest.key, mod_revision=revision - 1, resource=old)

    p.cache.desired[newest.key] = lagging
    lagged = await p.runtime.reconciler.reconcile(newest.key)
    assert lagged.result is Result.STALE and lagged.requeue_after == STALE_RECHECK_SECONDS

    p.cache.desired[newest.key] = lagging
    begin = PlanJournal.begin

    async def watch_delivers_meanwhile(self: PlanJournal, *args: Any, **kwargs: Any) -> bool:
        refused = await begin(self, *args, **kwargs)  # the change arrives while the refused write is out
        p.cache.desired[newest.key] = DesiredEntry(key=newest.key, mod_revision=revision, resource=newest)
        return refused

    monkeypatch.setattr(PlanJournal, "begin", watch_delivers_meanwhile)
    caught_up = await p.runtime.reconciler.reconcile(newest.key)
    assert caught_up.result is Result.STALE and caught_up.requeue_after is None
    assert not (tmp_path / "x").exists(), "a refused plan runs nothing"
