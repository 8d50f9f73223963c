"""SIGKILL at every step boundary of a 3-step plan whose middle step is not idempotent.

The promise under test: completed steps are never lost or re-run, a step cut
off mid-run is re-run only if idempotent, otherwise verified, and when it
cannot be verified the resource is held with "step N outcome unknown"
instead of risking a second run. The middle tool counts its calls in
`calls.log`; it must never have run twice.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import eventually

from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore

DAEMON = Path(__file__).with_name("counting_daemon.py")
KEY = "/desired/job/work"


class Run:
    def __init__(self, etcd: EmbeddedEtcd, store: EtcdStore, tmp: Path) -> None:
        self.prefix = f"/crash-{uuid.uuid4().hex[:8]}"
        self.keys = KeySpace(self.prefix)
        self.store = store
        self.dir = tmp / "job"
        self.dir.mkdir()
        self.config = tmp / "config.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "etcd": {"endpoints": [etcd.endpoint], "prefix": self.prefix},
                    "http": {"listen": "127.0.0.1:0"},
                    "reconciler": {"workers": 1},
                    # A restart after a SIGKILL waits for the dead run's lease: keep it short.
                    "election": {"lease_seconds": 2, "renew_seconds": 1.5, "retry_seconds": 0.5},
                    "log": {"level": "warning"},
                }
            )
        )
        self.log = tmp / "daemon.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - opened once, handed to the child
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(DAEMON), str(self.config), stdout=log, stderr=log
            )

    async def wait_exit(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            assert await self.wait_exit() == 0

    async def desire(self, **spec: Any) -> int:
        value = {"kind": "job", "name": "work", "spec": {"dir": str(self.dir), **spec}}
        return await self.store.put(self.prefix + KEY, json.dumps(value).encode())

    async def status(self) -> dict[str, Any] | None:
        kv = await self.store.get(self.prefix + "/status/job/work")
        return json.loads(kv.value) if kv else None

    async def wait_phase(self, phase: str, timeout: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.status()
            return status if status and status["phase"] == phase else None

        result: dict[str, Any] = await eventually(check, timeout=timeout, what=f"phase {phase}")
        return result

    async def record(self, plan_id: str) -> dict[str, Any]:
        kv = await self.store.get(self.keys.plan(plan_id))
        assert kv is not None
        return dict(json.loads(kv.value))

    def calls(self) -> list[str]:
        path = self.dir / "calls.log"
        return path.read_text().split() if path.exists() else []


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


@pytest.fixture
async def run(etcd: EmbeddedEtcd, store: EtcdStore, tmp_path: Path) -> AsyncIterator[Run]:
    r = Run(etcd, store, tmp_path)
    yield r
    if r.proc is not None and r.proc.returncode is None:
        r.proc.kill()
        await r.proc.wait()


async def crash_at(run: Run, point: str, *, verifiable: bool) -> str:
    """Start the daemon, let it die at `point`, and return the id of the plan it was running."""
    (run.dir / "kill_at").write_text(point)
    started = time.monotonic()
    await run.start()
    await run.desire(verifiable=verifiable)
    assert await run.wait_exit() == -9, "the daemon should have been SIGKILLed by its own tool"
    assert not (run.dir / "kill_at").exists()
    status = await run.status()
    assert status is not None and status["phase"] == "Executing" and status["plan_id"]
    record = await run.record(status["plan_id"])
    assert record["state"] == "executing"
    print(f"\n{point}: crashed {time.monotonic() - started:.2f} s after start, journal "
          f"{[s['state'] for s in record['steps']]}")
    return str(status["plan_id"])


@pytest.mark.parametrize(
    "point",
    ["prepare:before", "prepare:after", "launch:before", "launch:after", "finish:before", "finish:after"],
)
async def test_crash_at_a_step_boundary_never_runs_the_middle_step_twice(run: Run, point: str) -> None:
    plan_id = await crash_at(run, point, verifiable=True)
    calls_at_crash = run.calls()

    await run.start()
    status = await run.wait_phase("Converged")
    await run.stop()

    calls = run.calls()
    assert calls.count("launch") == 1, calls
    assert status["plan_id"] == plan_id, "the unfinished plan must be resumed, not replaced"
    record = await run.record(plan_id)
    assert record["state"] == "succeeded"
    assert [s["state"] for s in record["steps"]] == ["succeeded"] * 3
    # Steps completed before the crash are not run again.
    step, when = point.split(":")
    for done in ("prepare", "launch", "finish"):
        if done in calls_at_crash and not (done == step and when == "after"):
            assert calls.count(done) == 1, (done, calls)
    # The step cut off after its effect ran again only if idempotent (prepare, finish).
    if when == "after" and step != "launch":
        assert calls.count(step) == 2, calls
    crashed_step = record["steps"][["prepare", "launch", "finish"].index(step)]
    if step == "launch" and when == "after":
        assert "verified as done" in crashed_step["message"]
    if step == "launch" and when == "before":
        assert "verified as not done" in crashed_step["message"]


async def test_unverifiable_step_is_held_across_restarts_until_desired_changes(run: Run) -> None:
    plan_id = await crash_at(run, "launch:after", verifiable=False)

    await run.start()
    status = await run.wait_phase("Failed")
    assert status["message"].startswith("step 2 outcome unknown")
    assert status["plan_id"] == plan_id
    record = await run.record(plan_id)
    assert record["outcome_unknown_step"] == 2
    assert [s["state"] for s in record["steps"]] == ["succeeded", "failed", "skipped"]
    await asyncio.sleep(1)  # workers, retries and requeues get every chance to run it again
    await run.stop()

    await run.start()  # the hold survives a restart
    await asyncio.sleep(2)
    assert (await run.status() or {})["phase"] == "Failed"
    assert run.calls().count("launch") == 1

    revision = await run.desire(verifiable=False, note="checked by hand")  # the operator's go-ahead
    status = await run.wait_phase("Converged")
    await run.stop()

    assert status["observed_revision"] == revision
    assert run.calls().count("launch") == 1, "the launch had happened; the new plan must not repeat it"
    assert run.calls().count("finish") == 1
