"""An approved plan whose start write fails runs at most once: whether etcd applied that write (the answer
lost) or not, the record is read back before anything else, and the approval is consumed exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from counting_daemon import job_assembly
from harness import eventually, make_settings
from injection import fail_writes

from plans import ApprovalDecision
from policies import Policies
from reconciler.daemon import Daemon
from reconciler.decisions import decide
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore


def _is_begin_of_approved(prefix: str) -> Callable[[str, bytes], bool]:
    def predicate(key: str, value: bytes) -> bool:
        if not key.startswith(f"{prefix}/plans/"):
            return False
        record = json.loads(value)
        return record["state"] == "executing" and record.get("approval") is not None
    return predicate


@pytest.mark.parametrize("applied", [False, True], ids=["not-applied", "applied-answer-lost"])
async def test_an_approved_plan_whose_start_write_fails_runs_once(
    etcd: EmbeddedEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    prefix = f"/rv-{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    (tmp_path / "job").mkdir()
    assembly = job_assembly(Policies.model_validate({"defaults": {"low": "approve"}}))
    settings = make_settings(etcd, prefix, tmp_path, backoff_base_seconds=0.05, resync_seconds=1)
    daemon = Daemon(settings, assembly=assembly)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        async with EtcdStore([etcd.endpoint]) as store:
            value = {"kind": "job", "name": "work", "spec": {"dir": str(tmp_path / "job"), "verifiable": False}}
            await store.put(f"{prefix}/desired/job/work", json.dumps(value).encode())

            async def awaiting() -> dict[str, Any] | None:
                kv = await store.get(f"{prefix}/status/job/work")
                status = json.loads(kv.value) if kv else None
                return status if status and status["phase"] == "AwaitingApproval" else None

            status = await eventually(awaiting, what="awaiting approval")
            faults = fail_writes(monkeypatch, _is_begin_of_approved(prefix), applied=applied)
            result = await decide(store, keys, status["plan_id"], ApprovalDecision.APPROVE, by="alice", source="t")
            assert result.refused is None

            async def succeeded() -> bool:
                kv = await store.get(keys.plan(status["plan_id"]))
                return kv is not None and json.loads(kv.value)["state"] == "succeeded"

            await eventually(succeeded, what="the approved plan to succeed after the failed start")
            await asyncio.sleep(3)  # a few resyncs: nothing may run it again
            assert faults.failed, "the injected failure never happened"
            calls = (tmp_path / "job" / "calls.log").read_text().split()
            assert calls.count("launch") == 1, calls
            assert await store.get(keys.approval(status["plan_id"])) is None, "the approval was not consumed"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

