"""A resource held after an unknown step outcome stays held, whatever else happens to its target.

The hold is the promise that a step which may have run is not run again
until the operator has looked. A second resource that claims the same
target must not turn the hold into an `Invalid` status (which a restart
would not recognise as a hold, so the step could later run again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from counting_daemon import JobAgent
from pipeline import pipeline

from agents import AgentRegistry
from plans import PlanRecord, PlanState, Resource, Snapshot, StepState
from policies import Policies
from reconciler.assembly import Assembly
from reconciler.embedded import EmbeddedEtcd
from reconciler.outcome import Result
from reconciler.status import Phase, Status
from reconciler.store import EtcdStore
from tools import ToolRegistry


class ClaimingJobs(JobAgent):
    def claims(self, desired: Resource) -> frozenset[str]:
        return frozenset({f"job:{desired.spec['dir']}"})


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


async def test_a_held_resource_stays_held_when_a_rival_claims_its_target(store: EtcdStore, tmp_path: Path) -> None:
    agents = AgentRegistry([ClaimingJobs()])
    parts = Assembly(agents=agents, tools=ToolRegistry(agents.tools()), policies=Policies(),
                     poll_seconds={})  # fmt: skip
    p = pipeline(store, tmp_path, parts=parts)
    work = Resource(kind="job", name="work", spec={"dir": str(tmp_path), "verifiable": False})
    revision = await p.put(work)
    # What a crash while `job.launch` (neither idempotent nor verifiable) ran leaves in etcd.
    plan = await ClaimingJobs().reconcile(Snapshot(desired=work, revision=revision))
    record = PlanRecord.start(plan, decision="auto")
    record.state = PlanState.EXECUTING
    record.steps[0].state, record.steps[1].state = StepState.SUCCEEDED, StepState.RUNNING
    await store.put(p.keys.plan(record.plan.id), record.model_dump_json().encode())
    status = Status(
        phase=Phase.EXECUTING, observed_revision=revision, plan_id=record.plan.id, updated_at=record.created_at
    )
    await store.put(p.keys.status(work.key), status.model_dump_json().encode())
    assert await p.runtime.resumer.load(asyncio.Event()) == {work.key}

    rival = Resource(kind="job", name="rival", spec={"dir": str(tmp_path), "verifiable": False})
    await p.put(rival)
    for key in (work.key, rival.key):
        p.runtime.enqueue(key)  # as the watch does: the claim index learns of both

    first = await p.runtime.reconciler.reconcile(work.key)
    again = await p.runtime.reconciler.reconcile(work.key)

    assert (first.result, again.result) == (Result.OUTCOME_UNKNOWN, Result.HELD)
    assert (await p.status("work", kind="job"))["message"].startswith("step 2 outcome unknown")
    assert not (tmp_path / "calls.log").exists(), "nothing ran"

