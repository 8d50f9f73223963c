"""Approvals bound to the exact plan, against a real etcd and the real daemon (in-process).

A plan the policy sends for approval waits, unchanged, under `plans/<id>`;
approved, it runs exactly once (also across a restart in between); rejected,
the resource is `Blocked` until its value changes or a person asks to
replan; a decision for another hash, an expired plan, one voided by a new
desired value or a changed actual state, or from someone who may not
approve, executes nothing, and the refusal is in the plan record.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import POLL_SECONDS, Harness, eventually
from prometheus_client import generate_latest

from plans import Approval, ApprovalDecision
from reconciler.decisions import Refused, decide
from reconciler.keys import Section
from reconciler.settings import ApprovalSettings, WebhookSettings


async def _awaiting_deletion(h: Harness, name: str) -> dict[str, Any]:
    """Converge `name`, delete its desired value, and return the status of the deletion awaiting approval."""
    await h.put_desired(h.resource(name, "data\n"))
    await h.wait_status(name, "Converged")
    await h.store.delete(h.keys.desired(h.daemon_key(name)))
    return await h.wait_status(name, "AwaitingApproval")


async def _decide(h: Harness, plan_id: str, decision: str, **kwargs: Any) -> None:
    result = await decide(h.store, h.keys, plan_id, ApprovalDecision(decision), source="test", **kwargs)
    assert result.refused is None, result.message


async def _plan_ids(h: Harness) -> list[str]:
    kvs, _ = await h.store.get_prefix(h.keys.section(Section.PLANS))
    return [kv.key.decode().rsplit("/", 1)[-1] for kv in kvs]


async def test_an_approved_deletion_runs_once_and_the_approval_is_consumed(running: Harness) -> None:
    h = running
    status = await _awaiting_deletion(h, "doomed")
    plan_id = status["plan_id"]
    record = await h.plan_record(plan_id)
    assert record["state"] == "awaiting_approval" and record["decision_rule"] == "defaults.high"
    assert (h.root / "doomed").exists()

    await _decide(h, plan_id, "approve", by="alice", reason="decommissioned")

    async def removed() -> bool:
        return not (h.root / "doomed").exists() and await h.status("doomed") is None

    await eventually(removed, what="the approved deletion to run")
    record = await h.plan_record(plan_id)
    assert record["state"] == "succeeded"
    assert record["approval"]["by"] == "alice" and record["approval"]["reason"] == "decommissioned"
    assert await h.store.get(h.keys.approval(plan_id)) is None, "the approval is consumed by the run"
    assert len(await _plan_ids(h)) == 2  # the plan that wrote the file, and this one
    again = await decide(h.store, h.keys, plan_id, ApprovalDecision.APPROVE, by="bob", source="test")
    assert again.refused is Refused.NOT_APPLICABLE, "a plan that ran cannot be approved again"


async def test_a_waiting_plan_is_kept_as_it_is_not_replanned_at_every_resync(running: Harness) -> None:
    h = running
    status = await _awaiting_deletion(h, "steady")
    before = await _plan_ids(h)
    reviews = _reconciles(h, "awaiting_approval")

    for n in range(3):  # an external observer's writes: each one makes the daemon look at the resource again
        observed = {"kind": "file", "name": "steady", "state": {"n": n}, "observed_at": datetime.now(UTC).isoformat()}
        await h.store.put(h.keys.actual(h.daemon_key("steady")), json.dumps(observed).encode())
        await eventually(lambda n=n: _more(h, reviews + n), what=f"review {n + 1} of the waiting plan")

    assert await _plan_ids(h) == before
    assert (await h.status("steady"))["plan_id"] == status["plan_id"]


def _reconciles(h: Harness, result: str) -> float:
    assert h.daemon is not None
    value = h.daemon.metrics.registry.get_sample_value(
        "setpoint_reconcile_total", {"kind": "file", "result": result}
    )
    return value or 0.0


async def _more(h: Harness, than: float) -> bool:
    return _reconciles(h, "awaiting_approval") > than


async def test_an_approval_for_another_hash_executes_nothing_and_is_recorded(running: Harness) -> None:
    h = running
    status = await _awaiting_deletion(h, "forged")
    plan_id = status["plan_id"]

    # Written straight to etcd, as a forger would: `decide` refuses another hash before writing.
    forged = Approval(decision=ApprovalDecision.APPROVE, plan_hash="0" * 64, by="mallory", at=datetime.now(UTC))
    await h.store.put(h.keys.approval(plan_id), forged.model_dump_json().encode())

    async def refused() -> list[dict[str, Any]] | None:
        record = await h.plan_record(plan_id)
        return record["refusals"] or None

    refusals = await eventually(refused, what="the forged approval to be refused")
    assert refusals[0]["by"] == "mallory" and "an approval is bound to the exact plan" in refusals[0]["refused"]
    await asyncio.sleep(POLL_SECONDS * 5)
    assert (h.root / "forged").exists(), "a forged approval deleted the file"
    assert (await h.plan_record(plan_id))["state"] == "awaiting_approval"
    assert await h.store.get(h.keys.approval(plan_id)) is None, "the refused decision is removed"
    # The right hash still works afterwards.
    await _decide(h, plan_id, "approve", by="alice")
    await eventually(lambda: _absent(h, "forged"), what="the real approval to run")


async def _absent(h: Harness, name: str) -> bool:
    return not (h.root / name).exists()


async def test_a_rejected_plan_blocks_the_resource_until_replan(running: Harness) -> None:
    h = running
    status = await _awaiting_deletion(h, "kept")
    plan_id = status["plan_id"]

    await _decide(h, plan_id, "reject", by="bob", reason="still in use")

    blocked = await h.wait_status("kept", "Blocked")
    assert "rejected by bob: still in use" in blocked["message"] and "setpoint replan file/kept" in blocked["message"]
    assert (await h.plan_record(plan_id))["state"] == "rejected"
    plans = await _plan_ids(h)
    await asyncio.sleep(POLL_SECONDS * 5)
    assert await _plan_ids(h) == plans, "a rejected resource was planned again"
    assert (h.root / "kept").exists()

    await _decide(h, plan_id, "replan", by="bob")

    again = await h.wait_status("kept", "AwaitingApproval")
    assert again["plan_id"] != plan_id


async def test_a_plan_voided_by_a_changed_actual_state_is_planned_again(harness: Harness) -> None:
    h = harness
    h.use_policies({"defaults": {"low": "approve"}})
    await h.start()
    (h.root / "edited").write_text("before\n")
    await h.put_desired(h.resource("edited", "wanted\n"))
    first = (await h.wait_status("edited", "AwaitingApproval"))["plan_id"]

    (h.root / "edited").write_text("changed by hand\n")  # what the plan was made against is gone

    async def replanned() -> str | None:
        status = await h.status("edited")
        return status["plan_id"] if status and status["plan_id"] != first else None

    second = await eventually(replanned, what="a new plan for the changed file")
    voided = await h.plan_record(first)
    assert voided["state"] == "voided" and "changed before anyone decided" in voided["message"]
    refused = await decide(h.store, h.keys, first, ApprovalDecision.APPROVE, by="alice", source="test")
    assert refused.refused is Refused.NOT_APPLICABLE
    assert (await h.plan_record(second))["state"] == "awaiting_approval"
    assert (h.root / "edited").read_text() == "changed by hand\n"


async def test_a_new_desired_value_voids_the_waiting_plan(harness: Harness) -> None:
    h = harness
    h.use_policies({"defaults": {"low": "approve"}})
    await h.start()
    revision = await h.put_desired(h.resource("moving", "one\n"))
    first = (await h.wait_status("moving", "AwaitingApproval", revision=revision))["plan_id"]

    revision = await h.put_desired(h.resource("moving", "two\n"))
    second = (await h.wait_status("moving", "AwaitingApproval", revision=revision))["plan_id"]

    assert second != first
    assert (await h.plan_record(first))["state"] == "voided"
    await _decide(h, second, "approve", by="alice")
    await h.wait_status("moving", "Converged", revision=revision)
    assert (h.root / "moving").read_text() == "two\n"


async def test_an_expired_plan_executes_nothing(harness: Harness) -> None:
    h = harness
    h.settings = h.settings.model_copy(update={"approvals": ApprovalSettings(plan_ttl_seconds=0.5)})
    await h.start()
    status = await _awaiting_deletion(h, "late")

    blocked = await h.wait_status("late", "Blocked")
    assert "approval expired" in blocked["message"]
    assert (await h.plan_record(status["plan_id"]))["state"] == "expired"
    result = await decide(h.store, h.keys, status["plan_id"], ApprovalDecision.APPROVE, by="a", source="test")
    assert result.refused is Refused.NOT_APPLICABLE
    assert (h.root / "late").exists()


async def test_only_the_named_approvers_may_approve(harness: Harness) -> None:
    h = harness
    h.use_policies({"approvers": ["alice", "oncall-*"]})
    await h.start()
    plan_id = (await _awaiting_deletion(h, "guarded"))["plan_id"]

    await _decide(h, plan_id, "approve", by="mallory")

    async def refused() -> list[dict[str, Any]] | None:
        return (await h.plan_record(plan_id))["refusals"] or None

    refusals = await eventually(refused, what="mallory's approval to be refused")
    assert "mallory may not decide on this plan (approvers: alice, oncall-*)" in refusals[0]["refused"]
    assert (h.root / "guarded").exists()
    await _decide(h, plan_id, "approve", by="oncall-carol")
    await eventually(lambda: _absent(h, "guarded"), what="the approver's approval to run")


async def test_an_approval_given_while_the_daemon_is_down_runs_once_after_restart(harness: Harness) -> None:
    h = harness
    await h.start()
    plan_id = (await _awaiting_deletion(h, "restart"))["plan_id"]
    assert await h.stop() == 0

    await _decide(h, plan_id, "approve", by="alice")
    await h.start()

    await eventually(lambda: _absent(h, "restart"), what="the approved plan to run after the restart")
    assert (await h.plan_record(plan_id))["state"] == "succeeded"
    assert await h.stop() == 0
    await h.start()  # and not again
    await asyncio.sleep(POLL_SECONDS * 3)
    record = await h.plan_record(plan_id)
    assert record["state"] == "succeeded" and [s["state"] for s in record["steps"]] == ["succeeded"]


def test_a_decision_value_is_json_with_the_hash() -> None:
    approval = Approval.model_validate_json(
        json.dumps({"decision": "approve", "plan_hash": "a" * 64, "by": "x", "at": "2026-11-22T10:00:00Z"})
    )
    assert approval.decision is ApprovalDecision.APPROVE


async def test_hooks_hear_of_the_request_and_the_outcome_signed(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[dict[str, Any], str, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((json.loads(body), request.headers.get("X-Setpoint-Signature", ""), body))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    secret = tmp_path / "secret"
    secret.write_text("hook-secret\n")
    h = harness
    hook = WebhookSettings(url=f"http://127.0.0.1:{port}/hook", secret_file=str(secret))
    h.settings = h.settings.model_copy(
        update={"approvals": ApprovalSettings(
            webhooks=[hook], public_url="https://setpoint.example", token_env="SETPOINT_TEST_TOKEN"
        )}
    )  # fmt: skip
    monkeypatch.setenv("SETPOINT_TEST_TOKEN", "t0ken")
    try:
        await h.start()
        plan_id = (await _awaiting_deletion(h, "announced"))["plan_id"]
        await eventually(lambda: _count(received, 1), what="the approval request to reach the hook")
        await _decide(h, plan_id, "approve", by="alice")
        await eventually(lambda: _count(received, 2), what="the outcome to reach the hook")
    finally:
        await runner.cleanup()

    assert h.daemon is not None
    scraped = generate_latest(h.daemon.metrics.registry).decode()
    assert 'setpoint_hook_deliveries_total{result="delivered"} 2.0' in scraped
    (request, signature, body), (outcome, _, _) = received
    assert signature == "sha256=" + hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    assert request["event"] == "approval_requested" and request["plan_id"] == plan_id
    assert request["approve_url"] == f"https://setpoint.example/v1/plans/{plan_id}/approve"
    assert request["plan_hash"] == (await h.plan_record(plan_id))["plan_hash"]
    assert outcome["event"] == "outcome" and outcome["state"] == "succeeded" and outcome["approval"]["by"] == "alice"


async def _count(received: list[Any], n: int) -> bool:
    return len(received) >= n


async def test_a_rejection_holds_across_a_restart_until_replan(harness: Harness) -> None:
    h = harness
    await h.start()
    plan_id = (await _awaiting_deletion(h, "held"))["plan_id"]
    await _decide(h, plan_id, "reject", by="bob", reason="not yet")
    await h.wait_status("held", "Blocked")
    plans = await _plan_ids(h)
    assert await h.stop() == 0

    await h.start()
    await asyncio.sleep(POLL_SECONDS * 5)

    assert (await h.status("held"))["phase"] == "Blocked"
    assert await _plan_ids(h) == plans, "a rejected resource was planned again after a restart"
    await _decide(h, plan_id, "replan", by="bob")
    assert (await h.wait_status("held", "AwaitingApproval"))["plan_id"] != plan_id
