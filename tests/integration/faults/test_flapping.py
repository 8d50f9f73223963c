"""Flapping actual state: executed plans stay within the flap guard (issue 3).

A resource whose file keeps being changed by hand is a symptom to look at,
not something to fight forever. A background task overwrites the file on a
fixed period while the real daemon heals it; the flap guard must stop the
healing after `limits.flap_max_plans` executed plans in
`limits.flap_window_seconds`: the resource goes to `Blocked` with a message
naming the flap guard, `setpoint_flap_guard_blocked_total` counts it, and no
further plan runs for that key while the flapping goes on. A second resource
that does not flap is still healed: the guard is per key.

CI flaps every 0.25 s for 15 s with 4 plans per 60 s; `--soak` flaps every
second for 60 s with the defaults (6 plans per 600 s). Executed plans are
counted from the plan records under `plans/`, which setpoint writes for every
plan it runs and never deletes.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import POLL_SECONDS, Harness, eventually

from policies import Limits


async def _plans_for(h: Harness, name: str) -> list[dict[str, Any]]:
    kvs, _ = await h.store.get_prefix(h.keys.plan(""))
    records = [json.loads(kv.value) for kv in kvs]
    return [r for r in records if r["plan"]["resource"] == {"kind": "file", "name": name}]


async def _metric(h: Harness, sample: str) -> float:
    assert h.daemon is not None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{h.daemon.http_port}/metrics") as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _tamper(path: Path, n: int) -> None:
    path.write_text(f"changed by hand, time {n}\n")


@pytest.mark.timeout(900)  # the --soak sizes outlast the suite-wide 120 s
async def test_flapping_file_is_healed_at_most_flap_max_plans_times(harness: Harness, soak: bool) -> None:
    h = harness
    if soak:
        limits = Limits()  # the defaults: 6 plans per 600 s
        period, duration = 1.0, 60.0
    else:
        limits = Limits(flap_max_plans=4, flap_window_seconds=60)
        period, duration = 0.25, 15.0
    assert duration < limits.flap_window_seconds, "every plan of the run must fall in one window"
    h.use_policies({"limits": limits.model_dump()})
    await h.start()
    flapping, steady = h.root / "flapping", h.root / "steady"
    await h.put_desired(h.resource("flapping", "wanted\n"))
    await h.put_desired(h.resource("steady", "steady\n"))
    await h.wait_status("flapping", "Converged")
    await h.wait_status("steady", "Converged")

    phases: dict[str, int] = {}
    tripped_at: float | None = None
    started = time.monotonic()
    flaps = 0
    while (elapsed := time.monotonic() - started) < duration:
        await asyncio.to_thread(_tamper, flapping, flaps)
        flaps += 1
        status = await h.status("flapping")
        assert status is not None
        phases[status["phase"]] = phases.get(status["phase"], 0) + 1
        if tripped_at is None and status["phase"] == "Blocked":
            tripped_at = elapsed
        plans = await _plans_for(h, "flapping")
        assert len(plans) <= limits.flap_max_plans, f"{len(plans)} plans ran within {elapsed:.1f} s"
        await asyncio.sleep(period)
    # Give a plan that was about to start the time to show up.
    await asyncio.sleep(POLL_SECONDS * 5)

    plans = await _plans_for(h, "flapping")
    status = await h.status("flapping")
    assert status is not None
    assert len(plans) <= limits.flap_max_plans, [(p["plan"]["id"], p["state"]) for p in plans]
    assert len(plans) >= 2, "the flapping was never healed: the test proved nothing"
    assert all(p["state"] == "succeeded" for p in plans), [(p["plan"]["id"], p["state"], p["message"]) for p in plans]
    assert status["phase"] == "Blocked", status
    assert "flap guard" in status["message"], status
    blocked = await _metric(h, 'setpoint_flap_guard_blocked_total{kind="file"}')
    assert blocked >= 1, "setpoint_flap_guard_blocked_total did not count the blocked plan"
    assert flapping.read_text().startswith("changed by hand"), "a plan ran after the guard tripped"

    # The guard is per key: a hand edit of the other file is still healed.
    steady.write_text("changed once\n")

    async def healed() -> bool:
        return steady.read_text() == "steady\n"

    await eventually(healed, timeout=POLL_SECONDS * 25, what="the steady file healed")
    await h.wait_status("steady", "Converged")
    assert await h.stop() == 0

    print(
        f"\nflapping: {flaps} hand edits every {period:g} s for {duration:g} s; {len(plans)} plans executed "
        f"(flap_max_plans {limits.flap_max_plans} per {limits.flap_window_seconds:g} s); guard tripped "
        f"{tripped_at if tripped_at is None else round(tripped_at, 2)} s in; phases seen {phases}; "
        f"setpoint_flap_guard_blocked_total {blocked:g}"
    )
