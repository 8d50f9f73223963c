"""Rollback: when a step fails after earlier steps succeeded, the policy decides whether they are undone.

A two-step plan writes a config file, then a second file whose path is
blocked by a directory, so the second step fails. With `rollback: auto` the
first file gets back its previous content and mode, and the undo is
journalled like any step; with `approve` the undo is a plan of its own that
runs once approved; with `never` it keeps what the plan wrote; a
resource labelled secret keeps no previous value, so nothing is undone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pipeline import Pipeline, pipeline

from agents import AgentRegistry
from plans import (
    Approval,
    ApprovalDecision,
    ExecutionPlan,
    Issue,
    PlanRecord,
    PlanState,
    Resource,
    ResourceKey,
    RollbackMode,
    RollbackStep,
    Snapshot,
    Step,
    StepState,
    TemporaryError,
)
from policies import load_policies
from reconciler.assembly import Assembly
from reconciler.cache import ApprovalEntry
from reconciler.embedded import EmbeddedEtcd
from reconciler.outcome import Result
from reconciler.status import Phase, Status
from reconciler.store import EtcdStore
from tools import Tool, ToolRegistry
from tools.builtin.files import file_tools


class PairAgent:
    """Writes `first` and then `second` (paths in its spec), in one plan, whatever is observed."""

    name = "pair"
    kinds = frozenset({"pair"})

    def __init__(self, root: Path) -> None:
        self._tools = file_tools(allowed_roots=[str(root)])

    def tools(self) -> Sequence[Tool]:
        return self._tools

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        spec = snapshot.desired.spec
        steps = [
            Step(tool="file.write", parameters={"path": spec[which], "content": "new\n", "mode": "0640"},
                 description=f"write {which}")
            for which in ("first", "second")
        ]  # fmt: skip
        return snapshot.plan(agent=self.name, steps=steps, reasoning="write both")

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _rig(store: EtcdStore, root: Path, rollback: str, rules: str = "") -> Pipeline:
    agent = PairAgent(root)
    policy = root.parent / f"policies-{rollback}.yaml"
    policy.write_text(f"rollback: {{low: {rollback}}}\n{rules}")
    parts = Assembly(
        agents=AgentRegistry([agent]), tools=ToolRegistry(agent.tools()), policies=load_policies(policy),
        poll_seconds={},
    )  # fmt: skip
    return pipeline(store, root, parts=parts)


async def _run(p: Pipeline, root: Path, **labels: str) -> dict[str, Any]:
    first = root / "first.conf"
    first.write_text("old\n")
    first.chmod(0o600)
    (root / "second").mkdir()  # a directory where the second file should be: its write fails
    resource = Resource(kind="pair", name="p", labels=labels,
                        spec={"first": str(first), "second": str(root / "second")})  # fmt: skip
    await p.put(resource)
    with pytest.raises(TemporaryError):
        await p.runtime.reconciler.reconcile(resource.key)
    status = await p.status("p", kind="pair")
    if status["phase"] == "AwaitingApproval":  # the rollback waits: the failed plan is the one it undoes
        return await p.record((await p.record(status["plan_id"]))["plan"]["planner"].removeprefix("rollback:"))
    assert status["phase"] == "Failed"
    return await p.record(status["plan_id"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


async def test_auto_rollback_restores_the_file_a_later_failed_step_left_changed(store: EtcdStore, root: Path) -> None:
    record = await _run(_rig(store, root, "auto"), root)

    first = root / "first.conf"
    assert first.read_text() == "old\n" and (first.stat().st_mode & 0o777) == 0o600
    assert [s["state"] for s in record["steps"]] == ["succeeded", "failed"]
    assert record["steps"][0]["undo"]["parameters"] == {"path": str(first), "content": "old\n", "mode": "0600"}
    [undo] = record["rolled_back"]
    assert (undo["undoes"], undo["tool"], undo["state"]) == (0, "file.write", "succeeded")
    assert undo["started_at"] and undo["finished_at"]
    assert record["message"].endswith("rolled back: undid step 1")


async def test_never_leaves_what_the_plan_did(store: EtcdStore, root: Path) -> None:
    record = await _run(_rig(store, root, "never"), root)

    assert (root / "first.conf").read_text() == "new\n"
    assert record["rolled_back"] == [] and record["steps"][0]["undo"] is None
    assert "rolled back" not in record["message"]


async def test_a_secret_resource_keeps_no_previous_value_so_nothing_is_undone(store: EtcdStore, root: Path) -> None:
    record = await _run(_rig(store, root, "auto"), root, **{"setpoint/secret": "true"})

    assert (root / "first.conf").read_text() == "new\n"
    assert record["steps"][0]["undo"] is None
    assert "old" not in str(record), "the previous content is nowhere in the journal"
    assert "not rolled back: step 1 (file.write) cannot be undone: the previous value is secret" in record["message"]


async def _fresh(p: Pipeline, root: Path) -> dict[str, Any]:
    (root / "second").mkdir()
    resource = Resource(kind="pair", name="p", spec={"first": str(root / "fresh"), "second": str(root / "second")})
    await p.put(resource)
    with pytest.raises(TemporaryError):
        await p.runtime.reconciler.reconcile(resource.key)
    return await p.status("p", kind="pair")


async def test_an_undo_the_policy_would_not_run_on_its_own_waits_for_a_person(store: EtcdStore, root: Path) -> None:
    p = _rig(store, root, "auto")
    status = await _fresh(p, root)  # its undo deletes the file the plan created: high risk, approve by default

    assert (root / "fresh").read_text() == "new\n", "nothing is undone on its own"
    assert status["phase"] == "AwaitingApproval"
    rollback = await p.record(status["plan_id"])
    assert [s["tool"] for s in rollback["plan"]["steps"]] == ["file.delete"]
    failed = await p.record(rollback["plan"]["planner"].removeprefix("rollback:"))
    assert "the policy wants its undo approved" in failed["message"] and failed["rolled_back"] == []


async def test_an_undo_the_policy_denies_is_not_run(store: EtcdStore, root: Path) -> None:
    rules = "rules:\n  - {name: no-deletes, match: {tools: file.delete}, action: deny}\n"
    status = await _fresh(_rig(store, root, "auto", rules), root)

    assert (root / "fresh").exists()
    assert status["phase"] == "Failed"
    assert "not rolled back: the policy denies its undo (rule 'no-deletes' matched" in status["message"]


async def test_approve_stores_the_undo_as_a_plan_that_runs_once_approved(store: EtcdStore, root: Path) -> None:
    p = _rig(store, root, "approve")
    failed = await _run(p, root)
    first, key = root / "first.conf", ResourceKey(kind="pair", name="p")
    assert first.read_text() == "new\n", "nothing is undone before a person says so"
    assert failed["rolled_back"] == []

    status = await p.status("p", kind="pair")
    assert status["phase"] == "AwaitingApproval"
    assert status["message"].startswith(f"plan {failed['plan']['id']} failed; its rollback awaits approval")
    rollback = await p.record(status["plan_id"])
    assert rollback["plan"]["planner"] == f"rollback:{failed['plan']['id']}"
    assert [s["tool"] for s in rollback["plan"]["steps"]] == ["file.write"]
    assert (rollback["decision"], rollback["decision_rule"]) == ("approve", "rollback")

    approval = Approval(decision=ApprovalDecision.APPROVE, plan_hash=rollback["plan_hash"], by="alice",
                        at=datetime.now(UTC))  # fmt: skip
    revision = await store.put(p.keys.approval(rollback["plan"]["id"]), approval.model_dump_json().encode())
    p.cache.approvals[rollback["plan"]["id"]] = ApprovalEntry(rollback["plan"]["id"], revision, approval)
    outcome = await p.runtime.reconciler.reconcile(key)

    assert outcome.result is Result.ROLLED_BACK
    assert first.read_text() == "old\n" and (first.stat().st_mode & 0o777) == 0o600
    status = await p.status("p", kind="pair")
    assert status["phase"] == "Failed" and status["message"].startswith(f"rolled back by plan {rollback['plan']['id']}")
    assert (await p.record(rollback["plan"]["id"]))["state"] == "succeeded"


async def test_a_rollback_cut_off_by_a_crash_is_not_run_again_and_the_plan_says_so(
    store: EtcdStore, root: Path
) -> None:
    p = _rig(store, root, "auto")
    first = root / "first.conf"
    first.write_text("new\n")
    resource = Resource(kind="pair", name="p", spec={"first": str(first), "second": str(root / "second")})
    revision = await p.put(resource)
    # What a crash while undoing step 1 leaves in etcd: step 2 failed, the undo of step 1 `running`.
    plan = await PairAgent(root).reconcile(Snapshot(desired=resource, revision=revision))
    record = PlanRecord.start(plan, decision="auto")
    record.state, record.rollback = PlanState.EXECUTING, RollbackMode.AUTO
    undo = Step(tool="file.write", parameters={"path": str(first), "content": "old\n", "mode": "0600"})
    record.steps[0].state, record.steps[0].undo = StepState.SUCCEEDED, undo
    record.steps[1].state, record.steps[1].message = StepState.FAILED, "is a directory"
    record.rolled_back = [RollbackStep(index=0, tool="file.write", step=undo, undoes=0, state=StepState.RUNNING)]
    await store.put(p.keys.plan(record.plan.id), record.model_dump_json().encode())
    status = Status(phase=Phase.EXECUTING, observed_revision=revision, plan_id=record.plan.id,
                    updated_at=record.created_at)  # fmt: skip
    await store.put(p.keys.status(resource.key), status.model_dump_json().encode())
    assert await p.runtime.resumer.load(asyncio.Event()) == {resource.key}

    with pytest.raises(TemporaryError):
        await p.runtime.reconciler.reconcile(resource.key)

    settled = await p.record(record.plan.id)
    assert settled["state"] == "failed" and "the rollback did not finish" in settled["message"]
    assert settled["rolled_back"][0]["state"] == "failed"
    assert "unknown" in settled["rolled_back"][0]["message"]
    assert first.read_text() == "new\n", "the undo cut off is not run again"


async def test_a_plans_last_step_keeps_no_inverse_since_nothing_after_it_can_fail(store: EtcdStore, root: Path) -> None:
    p = pipeline(store, root)  # the built-in file agent: a one-step plan, rollback auto for its low risk
    (root / "motd").write_text("the previous content\n")
    resource = p.file("motd", "hello\n")
    await p.put(resource)

    await p.runtime.reconciler.reconcile(resource.key)

    record = await p.record((await p.status("motd"))["plan_id"])
    assert record["rollback"] == "auto" and record["state"] == "succeeded"
    assert (record["steps"][0]["undo"], record["steps"][0]["undo_note"]) == (None, "")
    assert "the previous content" not in str(record), "no previous value is journalled for nothing"
