"""Rollback edges: a rollback cut off by a failed journal write, a plan that did not verify, a step re-run
after a crash, and an undo the policy denies."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from injection import fail_writes, is_plan_record

sys.path.insert(0, str(Path(__file__).parent))
from test_rollback import _rig

from plans import Resource, TemporaryError
from reconciler.embedded import EmbeddedEtcd
from reconciler.store import EtcdStore, StoreUnavailableError


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


async def test_an_auto_rollback_cut_off_by_a_failed_journal_write_is_finished_or_reported(
    store: EtcdStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that journals the first rollback step `running` reaches etcd but its answer is lost (as a
    crash right after it would). The retry resumes the record: the undo must either run, or the record and
    status must say it was cut off. Today the rollback is silently dropped and its step stays `running`."""
    p = _rig(store, root, "auto")
    first = root / "first.conf"
    first.write_text("old\n")
    (root / "second").mkdir()
    resource = Resource(kind="pair", name="p", spec={"first": str(first), "second": str(root / "second")})
    await p.put(resource)
    fail_writes(
        monkeypatch, is_plan_record(p.keys.prefix, lambda r: bool(r.get("rolled_back"))), applied=True,
    )
    with pytest.raises(StoreUnavailableError):
        await p.runtime.reconciler.reconcile(resource.key)
    with pytest.raises(TemporaryError):  # the retry: resumes the kept record
        await p.runtime.reconciler.reconcile(resource.key)

    status = await p.status("p", kind="pair")
    record = await p.record(status["plan_id"])
    states = [u["state"] for u in record["rolled_back"]]
    print("status:", status["message"], "| rollback states:", states, "| first:", first.read_text().strip())
    assert "running" not in states, "a rollback step is left `running` in a settled record"
    assert first.read_text() == "old\n" or "roll" in record["message"], (
        "the undo neither ran nor is its interruption reported: " + record["message"]
    )


async def test_rollback_approve_is_not_offered_for_a_plan_whose_steps_all_succeeded(
    store: EtcdStore, tmp_path: Path
) -> None:
    """`rollback` is for 'a step fails after earlier steps succeeded'. A one-step plan whose step succeeded but
    whose verification failed has no failed step: `auto` (executor) rolls nothing back, but `approve` (runner)
    asks a person to undo the step anyway."""
    from pipeline import pipeline
    from test_verify_after_execute import _parts

    from policies import load_policies

    policy = tmp_path / "policies.yaml"
    policy.write_text("rollback: {low: approve}\n")
    parts = _parts(tmp_path, lying=True)
    parts = type(parts)(agents=parts.agents, tools=parts.tools, policies=load_policies(policy), poll_seconds={})
    p = pipeline(store, tmp_path, parts=parts)
    await p.put(p.file("motd", "hello\n"))
    with pytest.raises(TemporaryError, match="did not converge"):
        await p.runtime.reconciler.reconcile(p.file("motd", "").key)
    status = await p.status("motd")
    print("phase:", status["phase"], "|", status["message"][:300])
    assert status["phase"] != "AwaitingApproval", "a rollback of a plan with no failed step awaits approval"


async def test_a_step_rerun_after_a_crash_keeps_the_inverse_recorded_before_it_first_ran(
    store: EtcdStore, root: Path
) -> None:
    """A crash right after step 1 (file.write, idempotent) replaced the file, before `succeeded` was journalled:
    etcd holds step 1 `running` with its inverse (the old content). On resume step 1 is re-run, and the
    executor asks for its inverse again, now reading the file step 1 already wrote: the old content is
    overwritten in the journal by the new one. Step 2 then fails and the 'rollback' restores the new content,
    reporting 'rolled back: undid step 1'."""
    import asyncio
    from datetime import UTC, datetime

    from plans import PlanRecord, PlanState, RollbackMode, Snapshot, Step, StepState
    from reconciler.status import Phase

    p = _rig(store, root, "auto")
    first = root / "first.conf"
    first.write_text("new\n")  # what step 1 wrote before the crash
    first.chmod(0o640)
    (root / "second").mkdir()
    resource = Resource(kind="pair", name="p", spec={"first": str(first), "second": str(root / "second")})
    revision = await p.put(resource)
    agent = p.runtime.reconciler._agents.for_kind("pair")
    plan = await agent.reconcile(Snapshot(desired=resource, revision=revision))
    plan, _ = p.runtime.gate._tools.validate_plan(plan)
    record = PlanRecord.start(plan, decision="auto")
    record.rollback = RollbackMode.AUTO
    record.state = PlanState.EXECUTING
    record.steps[0].state, record.steps[0].started_at = StepState.RUNNING, datetime.now(UTC)
    record.steps[0].undo = Step(tool="file.write", parameters={"path": str(first), "content": "old\n", "mode": "0600"},
                                description="restore")  # fmt: skip
    await store.put(p.keys.plan(plan.id), record.model_dump_json().encode())
    await p.runtime.status.write(resource.key, phase=Phase.EXECUTING, revision=revision, plan_id=plan.id)

    assert await p.runtime.resumer.load(asyncio.Event()) is not None
    with pytest.raises(TemporaryError):
        await p.runtime.reconciler.reconcile(resource.key)
    final = await p.record(plan.id)
    print("message:", final["message"], "| undo kept:", final["steps"][0]["undo"]["parameters"]["content"])
    assert first.read_text() == "old\n", f"'{final['message']}', yet the file holds {first.read_text()!r}"


async def test_auto_rollback_does_not_run_a_step_the_policy_denies(store: EtcdStore, root: Path) -> None:
    """The policy denies file.delete on kind pair outright. A low-risk two-file plan fails at step 2; its
    auto rollback undoes step 1 (a file that did not exist) with file.delete, a high-risk step, without
    asking the policy: the denied step runs."""
    from pipeline import pipeline
    from test_rollback import PairAgent

    from agents import AgentRegistry
    from policies import load_policies
    from reconciler.assembly import Assembly
    from tools import ToolRegistry

    agent = PairAgent(root)
    policy = root.parent / "policies-deny.yaml"
    policy.write_text(
        "rollback: {low: auto}\n"
        "rules:\n  - {name: never-delete, match: {kind: pair, tools: [file.delete]}, action: deny}\n"
    )
    parts = Assembly(agents=AgentRegistry([agent]), tools=ToolRegistry(agent.tools()),
                     policies=load_policies(policy), poll_seconds={})  # fmt: skip
    p = pipeline(store, root, parts=parts)
    fresh = root / "fresh"
    (root / "second").mkdir()
    resource = Resource(kind="pair", name="p", spec={"first": str(fresh), "second": str(root / "second")})
    await p.put(resource)
    with pytest.raises(TemporaryError):
        await p.runtime.reconciler.reconcile(resource.key)
    record = await p.record((await p.status("p", kind="pair"))["plan_id"])
    print("rolled back:", [(u["tool"], u["state"]) for u in record["rolled_back"]])
    assert not any(u["tool"] == "file.delete" and u["state"] == "succeeded" for u in record["rolled_back"]), (
        "a step the policy denies ran as a rollback"
    )
