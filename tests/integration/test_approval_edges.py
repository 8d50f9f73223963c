"""Approvals at their edges: late decisions, approvers changed by a reload, plans edited in etcd or no longer
valid, a decision that lost a race with expiry, a resource forgotten while its plan waits, and short hashes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from harness import POLL_SECONDS, Harness, eventually

from plans import Approval, ApprovalDecision
from reconciler.decisions import Refused, decide
from reconciler.settings import ApprovalSettings


async def _awaiting_deletion(h: Harness, name: str) -> dict[str, Any]:
    await h.put_desired(h.resource(name, "data\n"))
    await h.wait_status(name, "Converged")
    await h.store.delete(h.keys.desired(h.daemon_key(name)))
    return await h.wait_status(name, "AwaitingApproval")


async def _write_decision(h: Harness, plan_id: str, plan_hash: str, by: str = "alice") -> None:
    """A decision written straight to etcd (as a late CLI write, or a forger, would)."""
    approval = Approval(decision=ApprovalDecision.APPROVE, plan_hash=plan_hash, by=by, at=datetime.now(UTC))
    await h.store.put(h.keys.approval(plan_id), approval.model_dump_json().encode())


async def test_an_approval_written_after_expiry_is_not_taken(harness: Harness) -> None:
    h = harness
    h.settings = h.settings.model_copy(update={"approvals": ApprovalSettings(plan_ttl_seconds=2)})
    await h.start()
    plan_id = (await _awaiting_deletion(h, "late"))["plan_id"]
    record = await h.plan_record(plan_id)
    assert await h.stop() == 0
    await asyncio.sleep(2.5)  # the plan expires while the daemon is down

    refused = await decide(h.store, h.keys, plan_id, ApprovalDecision.APPROVE, by="alice", source="test")
    await _write_decision(h, plan_id, record["plan_hash"])  # and one that got past the CLI
    await h.start()

    await h.wait_status("late", "Blocked")
    await asyncio.sleep(POLL_SECONDS * 5)
    assert refused.refused is Refused.NOT_APPLICABLE and "expired" in refused.message
    assert (h.root / "late").exists(), "an approval given after the plan expired deleted the file"
    assert (await h.plan_record(plan_id))["state"] == "expired"
    assert await h.store.get(h.keys.approval(plan_id)) is None, "the late decision is removed"
    replan = await decide(h.store, h.keys, plan_id, ApprovalDecision.REPLAN, by="bob", source="test")
    assert replan.refused is None, replan.message  # a leftover decision does not block replan


async def test_an_approver_removed_by_a_reload_may_no_longer_approve(harness: Harness) -> None:
    h = harness
    h.use_policies({"approvers": ["alice"]})
    daemon = await h.start()
    plan_id = (await _awaiting_deletion(h, "guarded"))["plan_id"]
    assert h.settings.policies.file is not None
    await asyncio.to_thread(Path(h.settings.policies.file).write_text, "approvers: [bob]\n")  # alice left the team
    assert daemon.reload_policies()

    await _write_decision(h, plan_id, (await h.plan_record(plan_id))["plan_hash"], by="alice")

    async def refused() -> list[dict[str, Any]] | None:
        return (await h.plan_record(plan_id))["refusals"] or None

    refusals = await eventually(refused, what="alice's approval to be refused")
    assert "alice may not decide on this plan (approvers: bob)" in refusals[0]["refused"]
    assert len(refusals) == 1, "a refused decision is recorded once"
    assert (h.root / "guarded").exists()


async def test_an_approved_plan_that_no_longer_validates_is_voided_not_wedged(harness: Harness) -> None:
    h = harness
    await h.start()
    plan_id = (await _awaiting_deletion(h, "odd"))["plan_id"]
    assert await h.stop() == 0
    kv = await h.store.get(h.keys.plan(plan_id))
    assert kv is not None
    record = json.loads(kv.value)
    record["plan"]["steps"][0]["tool"] = "file.removed_in_this_version"  # an upgrade renamed the tool
    record["plan_hash"] = _hash(record["plan"])
    await h.store.put(h.keys.plan(plan_id), json.dumps(record).encode())
    await h.start()

    await _write_decision(h, plan_id, record["plan_hash"])

    async def replaced() -> dict[str, Any] | None:
        status = await h.status("odd")
        return status if status and status["plan_id"] != plan_id and status["phase"] == "AwaitingApproval" else None

    await eventually(replaced, what="a fresh plan in place of the one that cannot run")
    assert (await h.plan_record(plan_id))["state"] == "voided"
    assert await h.store.get(h.keys.approval(plan_id)) is None


def _hash(plan: dict[str, Any]) -> str:
    from plans import ExecutionPlan

    return ExecutionPlan.model_validate(plan).content_hash()


async def test_a_plan_edited_in_etcd_is_not_run_under_its_old_hash(harness: Harness) -> None:
    h = harness
    await h.start()
    (h.root / "other").write_text("precious\n")
    plan_id = (await _awaiting_deletion(h, "doomed"))["plan_id"]
    assert await h.stop() == 0
    kv = await h.store.get(h.keys.plan(plan_id))
    assert kv is not None
    record = json.loads(kv.value)
    record["plan"]["steps"][0]["parameters"]["path"] = str(h.root / "other")  # plan_hash left as it was
    await h.store.put(h.keys.plan(plan_id), json.dumps(record).encode())
    await h.start()

    await _write_decision(h, plan_id, record["plan_hash"])
    await asyncio.sleep(POLL_SECONDS * 10)

    assert (h.root / "other").exists(), "a plan edited in etcd ran under the approval of the original hash"


async def test_a_forgotten_resource_leaves_no_plan_waiting(harness: Harness) -> None:
    h = harness
    h.use_policies({"defaults": {"low": "approve"}})
    daemon = await h.start()
    await h.put_desired(h.resource("kept", "wanted\n"))
    plan_id = (await h.wait_status("kept", "AwaitingApproval"))["plan_id"]

    marked = h.resource("kept", "wanted\n") | {"labels": {"setpoint/keep": "true"}}  # `delete --keep`
    await h.put_desired(marked)
    await h.store.delete(h.keys.desired(h.daemon_key("kept")))

    async def forgotten() -> bool:
        return await h.status("kept") is None

    await eventually(forgotten, what="the kept resource to be forgotten")
    await asyncio.sleep(POLL_SECONDS * 3)
    assert daemon.metrics.approvals_pending._value.get() == 0  # type: ignore[attr-defined]
    assert (await h.plan_record(plan_id))["state"] == "voided"


async def test_approve_takes_the_short_hash_it_prints_and_bad_input_is_one_sentence(
    harness: Harness, tmp_path: Path
) -> None:
    h = harness
    await h.start()
    plan_id = (await _awaiting_deletion(h, "short"))["plan_id"]
    record = await h.plan_record(plan_id)
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"etcd": {"endpoints": list(h.settings.etcd.endpoints),
                                               "prefix": h.settings.etcd.prefix}}))  # fmt: skip

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "reconciler.cli", "approve", plan_id, "-c", str(config), *args]
        return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)

    too_long = await cli("--by", "x" * 101)
    wrong = await cli("--hash", "0" * 12)
    right = await cli("--hash", record["plan_hash"][:12], "--by", "alice")

    for result in (too_long, wrong):
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "by" in too_long.stderr and "it is not the plan you reviewed" in wrong.stderr
    assert right.returncode == 0, right.stderr
    await eventually(lambda: _gone(h, "short"), what="the approved deletion")


async def _gone(h: Harness, name: str) -> bool:
    return not (h.root / name).exists()
