"""What recovery gives back after a restart, and only that: no plan counted twice, no baseline of another value.

Each test leaves in etcd what a previous run would have left, then drives the
assembled pipeline through recovery and a reconcile.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from injection import fail_writes
from pipeline import Pipeline, pipeline

from agents.builtin.file import FileAgent
from plans import PlanRecord, PlanState, Resource, Snapshot, StepState
from reconciler.embedded import EmbeddedEtcd
from reconciler.status import Phase, Status
from reconciler.store import EtcdStore, StoreUnavailableError


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _state(content: str) -> dict[str, object]:
    return {"exists": True, "sha256": hashlib.sha256(content.encode()).hexdigest(), "mode": "0644"}


async def _leave_status(p: Pipeline, resource: Resource, **fields: object) -> None:
    status = Status(updated_at=datetime.now(UTC), **fields)  # type: ignore[arg-type]
    await p.store.put(p.keys.status(resource.key), status.model_dump_json().encode())


async def test_a_plan_resumed_after_a_restart_is_counted_once_by_the_flap_guard(
    store: EtcdStore, tmp_path: Path
) -> None:
    p = pipeline(store, tmp_path)
    resource = p.file("a", "x\n")
    revision = await p.put(resource)
    plan = await FileAgent(allowed_roots=[str(tmp_path)]).reconcile(Snapshot(desired=resource, revision=revision))
    record = PlanRecord.start(plan, decision="auto")  # cut off while its (idempotent) write ran
    record.state, record.steps[0].state = PlanState.EXECUTING, StepState.RUNNING
    await store.put(p.keys.plan(plan.id), record.model_dump_json().encode())
    began = datetime.now(UTC) - timedelta(seconds=5)
    await _leave_status(
        p, resource, phase=Phase.EXECUTING, observed_revision=revision, plan_id=plan.id, recent_plans=[began]
    )
    await p.runtime.resumer.load(asyncio.Event())

    await p.runtime.reconciler.reconcile(resource.key)

    status = await p.status("a")
    assert status["phase"] == "Converged" and status["plan_id"] == plan.id
    assert len(status["recent_plans"]) == 1, "the resumed plan was counted again"


async def test_a_baseline_of_a_value_changed_while_down_is_not_restored(store: EtcdStore, tmp_path: Path) -> None:
    p = pipeline(store, tmp_path)
    v1, v2 = p.file("a", "v1\n"), p.file("a", "v2\n")
    revision = await p.put(v2)  # changed while setpoint was down...
    (tmp_path / "a").write_text("v2\n")  # ...and already in place
    await _leave_status(
        p, v1, phase=Phase.CONVERGED, observed_revision=revision - 1, applied=v1, baseline=_state("v1\n")
    )

    await p.runtime.resumer.load(asyncio.Event())
    await p.runtime.observer.poll_all()

    assert p.runtime.observer.drifted("file") == frozenset(), "v2 in place measured against v1's look"


async def test_a_converged_status_without_a_baseline_gets_one(store: EtcdStore, tmp_path: Path) -> None:
    """Statuses written before baselines existed would otherwise never get one, and never pause healing."""
    p = pipeline(store, tmp_path)
    resource = p.file("a", "x\n")
    revision = await p.put(resource)
    (tmp_path / "a").write_text("x\n")
    await _leave_status(p, resource, phase=Phase.CONVERGED, observed_revision=revision, applied=resource)
    await p.runtime.resumer.load(asyncio.Event())

    await p.runtime.reconciler.reconcile(resource.key)

    assert (await p.status("a"))["baseline"] == _state("x\n")


async def test_after_a_removal_whose_answer_was_lost_the_status_is_read_again(
    store: EtcdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline(store, tmp_path)
    resource = p.file("a", "x\n")
    await p.put(resource)
    await p.runtime.reconciler.reconcile(resource.key)  # converged, with `applied`
    (tmp_path / "a").unlink()  # nothing left to tear down: the removal is one transaction
    await p.delete(resource.key)
    fail_writes(monkeypatch, lambda key, value: key == p.keys.status(resource.key), applied=True)

    with pytest.raises(StoreUnavailableError):
        await p.runtime.reconciler.reconcile(resource.key)

    assert await p.runtime.status.applied(resource.key) is None, "etcd has no status any more"
