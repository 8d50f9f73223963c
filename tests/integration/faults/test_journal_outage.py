"""etcd refusing a journal write mid-plan must not make the retry repeat a step that already ran.

Our own etcd wrapper fails exactly once, on the write that records a chosen
journal state: the non-idempotent `launch` step succeeded (it ran: the retry
must resume from the in-memory journal, not re-plan and launch again), or
started (it never ran: the retry must run it, not hold the resource), or a
failed plan's outcome (the retry must record the failure, not success).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from counting_daemon import job_assembly
from harness import Harness, eventually, make_settings
from injection import fail_writes, is_plan_record

from policies import Policies
from reconciler.daemon import Daemon
from reconciler.embedded import EmbeddedEtcd
from reconciler.store import EtcdStore


async def _run_job(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the daemon with the job agent until job/work is Converged or Failed; its status and plan record."""
    daemon = Daemon(make_settings(etcd, prefix, tmp_path, backoff_base_seconds=0.05), assembly=job_assembly(Policies()))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        async with EtcdStore([etcd.endpoint]) as store:
            value = {"kind": "job", "name": "work", "spec": {"dir": str(tmp_path / "job"), "verifiable": False}}
            await store.put(f"{prefix}/desired/job/work", json.dumps(value).encode())

            async def settled() -> dict[str, Any] | None:
                kv = await store.get(f"{prefix}/status/job/work")
                status = json.loads(kv.value) if kv else None
                return status if status and status["phase"] in ("Converged", "Failed") else None

            status = await eventually(settled, timeout=20, what="the job to converge or fail")
            kv = await store.get(f"{prefix}/plans/{status['plan_id']}")
            assert kv is not None
            return status, json.loads(kv.value)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def test_a_failed_journal_write_after_a_step_ran_resumes_instead_of_repeating_it(
    etcd: EmbeddedEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"/outage-{uuid.uuid4().hex[:8]}"
    (tmp_path / "job").mkdir()
    faults = fail_writes(monkeypatch, is_plan_record(prefix, lambda r: r["steps"][1]["state"] == "succeeded"))

    status, record = await _run_job(etcd, prefix, tmp_path)

    assert faults.failed, "the injected failure never happened"
    assert status["phase"] == "Converged", status["message"]
    calls = (tmp_path / "job" / "calls.log").read_text().split()
    assert calls.count("launch") == 1, calls
    assert calls.count("prepare") == 1, calls
    assert record["state"] == "succeeded"
    # The same 3-step plan finished (a fresh plan would have had only the steps left to do).
    assert [s["state"] for s in record["steps"]] == ["succeeded"] * 3


async def test_a_failed_journal_write_before_a_step_runs_does_not_hold_the_resource(
    etcd: EmbeddedEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write that marks the non-idempotent step `running` fails: the tool was never called,
    so the retry must run it (once), not hold the resource as "outcome unknown"."""
    prefix = f"/outage-{uuid.uuid4().hex[:8]}"
    (tmp_path / "job").mkdir()
    faults = fail_writes(monkeypatch, is_plan_record(prefix, lambda r: r["steps"][1]["state"] == "running"))

    status, _ = await _run_job(etcd, prefix, tmp_path)

    assert faults.failed, "the injected failure never happened"
    assert status["phase"] == "Converged", status["message"]
    calls = (tmp_path / "job" / "calls.log").read_text().split()
    assert calls == ["prepare", "launch", "finish"], calls


async def test_a_failed_plan_whose_last_journal_write_failed_is_not_recorded_as_success(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step fails, then the write recording that fails too: the retry must settle the plan as
    failed, never run nothing and call it succeeded."""
    (harness.root / "not-a-dir").write_text("")  # every write under it fails
    faults = fail_writes(monkeypatch, is_plan_record(harness.keys.prefix, lambda r: r["state"] == "failed"))
    await harness.start()

    await harness.put_desired(harness.resource("stuck", "x\n", path=str(harness.root / "not-a-dir" / "stuck")))

    await eventually(lambda: _true(bool(faults.failed)), what="the injected failure")
    plan_id = faults.failed[0].rsplit("/", 1)[1]

    async def finished() -> dict[str, Any] | None:
        record = await harness.plan_record(plan_id)
        return record if record["state"] not in ("executing", "pending") else None

    record = await eventually(finished, what=f"plan {plan_id} to be settled")
    assert record["state"] == "failed", record
    assert [s["state"] for s in record["steps"]] == ["failed"]
    assert "not-a-dir is in the way: it is not a directory" in record["message"]
    status = await harness.status("stuck")
    assert status is not None and status["applied"] is None, "a plan that failed must not count as converged"


async def _true(value: bool) -> bool:
    return value
