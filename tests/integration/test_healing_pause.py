"""Limits in the running daemon: a mass failure pauses healing instead of fighting it."""

from __future__ import annotations

import os

import aiohttp
from harness import Harness, eventually


async def test_mass_drift_pauses_healing_and_resumes_when_fixed(running: Harness, tmp_path) -> None:
    sub = running.root / "app"
    names = [f"part{i}" for i in range(4)]
    for name in names:
        await running.put_desired(running.resource(name, f"{name}\n", path=str(sub / name)))
    await running.put_desired(running.resource("elsewhere", "e\n"))
    for name in [*names, "elsewhere"]:
        await running.wait_status(name, "Converged")

    os.rename(sub, tmp_path / "moved-away")  # 4 of 5 files vanish at once

    for name in names:
        status = await running.wait_status(name, "Blocked")
        assert "healing of kind 'file' is paused: 4 of 5 resources need healing" in status["message"]
    assert not sub.exists(), "no file may be recreated while healing is paused"
    assert running.daemon is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{running.daemon.http_port}/metrics") as resp:
            assert 'setpoint_healing_paused_total{kind="file"}' in await resp.text()

    os.rename(tmp_path / "moved-away", sub)  # the operator fixes the common cause

    async def converged_again() -> bool:
        phases = [(await running.status(n) or {}).get("phase") for n in names]
        return all(phase == "Converged" for phase in phases)

    await eventually(converged_again, timeout=10, what="resources to converge once the cause is fixed")


async def test_a_single_drift_among_many_is_healed(running: Harness) -> None:
    for i in range(5):
        await running.put_desired(running.resource(f"single{i}", "s\n"))
    for i in range(5):
        await running.wait_status(f"single{i}", "Converged")

    (running.root / "single0").unlink()

    async def healed() -> bool:
        return (running.root / "single0").exists()

    await eventually(healed, what="a lone drifted file to be healed")
