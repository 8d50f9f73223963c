"""A process plan approved or resumed after a daemon restart runs (real daemon, etcd, processes)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import Harness
from test_process_lifecycle import napper, one_running, phase, procs, with_argv  # noqa: F401

from plans import ApprovalDecision


async def test_a_start_approved_after_a_daemon_restart_runs(procs: Harness) -> None:  # noqa: F811
    """A process.start waits for approval (policy: low -> approve). The daemon restarts, then the operator
    approves. The approved plan must start the process; today its step fails with 'not a process resource
    this daemon knows', because only a call to the agent's parse() registers the launch, and neither the
    approval path nor the resume path calls it after a restart."""
    procs.use_policies({"defaults": {"low": "approve"}})
    await procs.start()
    value, argv = napper("web")
    revision = await procs.put_desired(value)
    waiting = await phase(procs, "web", "AwaitingApproval", observed_revision=revision)
    assert await procs.stop() == 0

    await procs.start()
    await asyncio.sleep(1.0)
    from reconciler.decisions import decide

    result = await decide(procs.store, procs.keys, waiting["plan_id"], ApprovalDecision.APPROVE, by="alice",
                          source="test")  # fmt: skip
    assert result.refused is None, result.message

    async def settled() -> dict | None:
        ran = await procs.plan_record(waiting["plan_id"])
        return ran if ran["state"] in ("succeeded", "failed") else None

    from harness import eventually

    ran = await eventually(settled, timeout=20, what="the approved plan to settle")
    print("approved plan:", ran["state"], "|", ran["message"][:200])
    assert ran["state"] == "succeeded", ran["message"]
    await one_running(argv)

