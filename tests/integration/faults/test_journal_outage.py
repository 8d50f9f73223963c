"""etcd refusing a journal write mid-plan must not make the retry repeat a step that already ran.

Our own etcd wrapper (`EtcdStore.put`) fails exactly once, on the write that
records the non-idempotent `launch` step as succeeded. The step has run; the
retry must resume from the in-memory journal, not re-plan and launch again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from counting_daemon import JobAgent
from harness import eventually, make_settings

from agents import AgentRegistry
from policies import PolicySet, RiskCeiling
from reconciler.assembly import Assembly
from reconciler.daemon import Daemon
from reconciler.embedded import EmbeddedEtcd
from reconciler.store import EtcdStore, StoreUnavailableError
from tools import ToolRegistry


async def test_a_failed_journal_write_after_a_step_ran_resumes_instead_of_repeating_it(
    etcd: EmbeddedEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"/outage-{uuid.uuid4().hex[:8]}"
    job = tmp_path / "job"
    job.mkdir()
    real_put = EtcdStore.put
    failed: list[str] = []

    async def flaky_put(self: EtcdStore, key: str, value: bytes) -> int:
        if not failed and "/plans/" in key:
            steps = json.loads(value)["steps"]
            if steps[1]["state"] == "succeeded":
                failed.append(key)
                raise StoreUnavailableError("injected: etcd did not answer the journal write")
        return await real_put(self, key, value)

    monkeypatch.setattr(EtcdStore, "put", flaky_put)
    agents = AgentRegistry([JobAgent()])
    assembly = Assembly(
        agents=agents, tools=ToolRegistry(agents.tools()), policies=PolicySet([RiskCeiling()]), poll_seconds={}
    )
    settings = make_settings(etcd, prefix, tmp_path, backoff_base_seconds=0.05)
    daemon = Daemon(settings, assembly=assembly)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        async with EtcdStore([etcd.endpoint]) as store:
            value = {"kind": "job", "name": "work", "spec": {"dir": str(job), "verifiable": False}}
            await real_put(store, f"{prefix}/desired/job/work", json.dumps(value).encode())

            async def converged() -> dict[str, Any] | None:
                kv = await store.get(f"{prefix}/status/job/work")
                status = json.loads(kv.value) if kv else None
                return status if status and status["phase"] == "Converged" else None

            status = await eventually(converged, timeout=20, what="the job to converge after the outage")
            kv = await store.get(f"{prefix}/plans/{status['plan_id']}")
            assert kv is not None
            record = json.loads(kv.value)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    assert failed, "the injected failure never happened"
    calls = (job / "calls.log").read_text().split()
    assert calls.count("launch") == 1, calls
    assert calls.count("prepare") == 1, calls
    assert record["state"] == "succeeded"
    # The same 3-step plan finished (a fresh plan would have had only the steps left to do).
    assert [s["state"] for s in record["steps"]] == ["succeeded"] * 3
