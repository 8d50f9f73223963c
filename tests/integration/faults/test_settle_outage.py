"""A plan whose outcome was decided but not written is settled only for the value it was made for.

The plan runs; the transaction recording its outcome fails (etcd did not
answer). The record in memory is kept for the retry. If the desired value
moved meanwhile (changed, or deleted), the retry must write the plan's
outcome to its record and then plan afresh for the new value: a deleted
resource is torn down, a changed one gets its new content. Settling the old
outcome against the new value would drop a deleted resource without teardown,
or call a value converged that was never applied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import DELETES_RUN
from injection import fail_writes, is_plan_record
from pipeline import Pipeline, pipeline

from plans import Resource
from reconciler.embedded import EmbeddedEtcd
from reconciler.outcome import Result
from reconciler.store import EtcdStore, StoreUnavailableError


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def _decided_but_unwritten(p: Pipeline, resource: Resource, monkeypatch: pytest.MonkeyPatch, outcome: str) -> str:
    """Reconcile `resource` once, with the write of its plan's outcome failing; the plan's id."""
    faults = fail_writes(monkeypatch, is_plan_record(p.keys.prefix, lambda r: r["state"] == outcome))
    with pytest.raises(StoreUnavailableError):
        await p.runtime.reconciler.reconcile(resource.key)
    assert faults.failed, "the injected failure never happened"
    return faults.failed[0].rsplit("/", 1)[1]


async def test_a_resource_deleted_while_its_outcome_was_unwritten_is_still_torn_down(
    store: EtcdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline(store, tmp_path, policies=DELETES_RUN)  # deletes run
    resource = p.file("a", "hello\n")
    await p.put(resource)
    plan_id = await _decided_but_unwritten(p, resource, monkeypatch, "succeeded")

    await p.delete(resource.key)
    outcome = await p.runtime.reconciler.reconcile(resource.key)

    assert (await p.record(plan_id))["state"] == "succeeded", "the kept outcome is written to its record"
    assert outcome.result is Result.REMOVED
    assert not (tmp_path / "a").exists(), "the deleted resource's file was never torn down"


async def test_a_value_changed_while_the_outcome_was_unwritten_is_applied_not_assumed(
    store: EtcdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline(store, tmp_path)
    await p.put(p.file("a", "v1\n"))
    await _decided_but_unwritten(p, p.file("a", "v1\n"), monkeypatch, "succeeded")

    revision = await p.put(p.file("a", "v2\n"))
    outcome = await p.runtime.reconciler.reconcile(p.file("a", "").key)

    assert outcome.result is Result.CONVERGED
    assert (tmp_path / "a").read_text() == "v2\n", "converged at the new value's revision with the old content"
    status = await p.status("a")
    assert (status["observed_revision"], status["applied"]["spec"]["content"]) == (revision, "v2\n")


async def test_a_failure_that_was_unwritten_is_not_reported_against_a_newer_value(
    store: EtcdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline(store, tmp_path)
    (tmp_path / "not-a-dir").write_text("")
    broken = Resource(kind="file", name="a", spec={"path": str(tmp_path / "not-a-dir" / "a"), "content": "x"})
    await p.put(broken)  # every write under a file fails
    plan_id = await _decided_but_unwritten(p, broken, monkeypatch, "failed")

    await p.put(p.file("a", "fixed\n"))  # the operator points it somewhere sensible
    outcome = await p.runtime.reconciler.reconcile(broken.key)

    assert (await p.record(plan_id))["state"] == "failed"
    assert outcome.result is Result.CONVERGED
    assert (tmp_path / "a").read_text() == "fixed\n"
