"""A restart does not release the brakes: the healing pause and the flap guard remember.

An operator, systemd or a crash restarting the daemon must not turn a paused
mass failure into a mass "healing" (a volume that failed to mount, every file
on it missing: writing them all onto the root file system is what the pause
is for), nor give a flapping resource a fresh budget of plans.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from harness import Harness

from reconciler.keys import Section

PARTS = [f"part{i}" for i in range(4)]


async def _converge_parts(h: Harness) -> Path:
    sub = h.root / "volume"
    for name in PARTS:
        await h.put_desired(h.resource(name, f"{name}\n", path=str(sub / name)))
    await h.put_desired(h.resource("elsewhere", "e\n"))
    for name in [*PARTS, "elsewhere"]:
        await h.wait_status(name, "Converged")
    return sub


async def _still_paused(h: Harness, sub: Path) -> None:
    for name in PARTS:
        status = await h.wait_status(name, "Blocked")
        assert "healing of kind 'file' is paused: 4 of 5" in status["message"], status["message"]
    await asyncio.sleep(1)  # every worker gets its chance to do the wrong thing
    assert not await asyncio.to_thread(sub.exists), "files were recreated while most of their kind was gone"


async def test_a_mass_failure_while_the_daemon_was_down_still_pauses_healing(harness: Harness, tmp_path: Path) -> None:
    await harness.start()
    sub = await _converge_parts(harness)
    assert await harness.stop() == 0

    os.rename(sub, tmp_path / "unmounted")  # the volume goes away while setpoint is down
    await harness.start()

    await _still_paused(harness, sub)


async def test_a_pause_in_force_survives_a_restart(harness: Harness, tmp_path: Path) -> None:
    await harness.start()
    sub = await _converge_parts(harness)
    os.rename(sub, tmp_path / "unmounted")
    for name in PARTS:
        await harness.wait_status(name, "Blocked")
    assert await harness.stop() == 0

    await harness.start()

    await _still_paused(harness, sub)


async def test_the_flap_guard_window_survives_a_restart(harness: Harness) -> None:
    harness.use_policies({"limits": {"flap_max_plans": 2}})
    (harness.root / "not-a-dir").write_text("")  # every write under it fails
    await harness.start()
    await harness.put_desired(harness.resource("stuck", "x\n", path=str(harness.root / "not-a-dir" / "stuck")))
    await harness.wait_status("stuck", "Blocked")
    assert await harness.stop() == 0

    await harness.start()
    await asyncio.sleep(1.5)  # retries and resyncs get every chance

    status = await harness.status("stuck")
    assert status is not None and status["phase"] == "Blocked" and "flap guard" in status["message"], status
    assert "the last one failed" in status["message"] and "is in the way" in status["message"], "root cause lost"
    plans, _ = await harness.store.get_prefix(harness.keys.section(Section.PLANS))
    assert len(plans) == 2, "a restart gave the flapping resource a new budget of plans"
    assert [json.loads(kv.value)["state"] for kv in plans] == ["failed", "failed"]
