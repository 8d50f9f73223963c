"""Two daemons in-process on one prefix: the standby serves the API (an approval sent to it is taken by the
leader), says `ready: standby`, and leads once the leader stops cleanly, with what was left to do."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from harness import Harness, eventually, sample_value

from reconciler.daemon import Daemon
from reconciler.settings import ApprovalSettings, ElectionSettings

TOKEN = "standby-token"


def _daemon_settings(h: Harness, tmp_path: Path, name: str) -> Harness:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    settings = h.settings.model_copy(
        update={
            "approvals": ApprovalSettings(token_file=str(token)),
            "election": ElectionSettings(member_id=name, lease_seconds=2, renew_seconds=1.5, retry_seconds=0.5),
        }
    )
    return Harness(store=h.store, keys=h.keys, root=h.root, settings=settings)


async def _readyz(daemon: Daemon) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{daemon.http_port}/readyz") as r:
        return f"{r.status} {(await r.text()).strip()}"


async def test_the_standby_takes_approvals_and_leads_when_the_leader_stops(harness: Harness, tmp_path: Path) -> None:
    harness.use_policies({})  # deleting a file (high) waits for a person
    first = _daemon_settings(harness, tmp_path, "first")
    second = _daemon_settings(harness, tmp_path, "second")
    leader = await first.start()
    standby = await second.start()
    try:
        assert await _readyz(leader) == "200 ready: leader"
        assert await _readyz(standby) == "200 ready: standby"
        gauge = f'setpoint_leader{{prefix="{harness.keys.prefix}"}}'
        assert sample_value(standby.metrics.registry, gauge) == 0

        await harness.put_desired(harness.resource("doomed", "x\n"))
        await harness.wait_status("doomed", "Converged")
        await harness.store.delete(harness.keys.desired(harness.daemon_key("doomed")))
        plan_id = (await harness.wait_status("doomed", "AwaitingApproval"))["plan_id"]

        url = f"http://127.0.0.1:{standby.http_port}/v1/plans/{plan_id}/approve"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, json={"by": "alice"}) as r:
                assert r.status == 200, await r.text()

        async def removed() -> bool:
            return await harness.status("doomed") is None and not (harness.root / "doomed").exists()

        await eventually(removed, what="the leader to run the deletion approved through the standby")
        assert (await harness.plan_record(plan_id))["state"] == "succeeded"

        stopped = time.monotonic()
        assert await first.stop() == 0

        async def leads() -> bool:
            return await _readyz(standby) == "200 ready: leader"

        await eventually(leads, what="the standby to lead once the leader revoked its lease")
        print(f"\nclean stop to the standby leading: {time.monotonic() - stopped:.2f} s")
        assert sample_value(standby.metrics.registry, gauge) == 1
        await harness.put_desired(harness.resource("later", "y\n"))
        await harness.wait_status("later", "Converged")
        assert (harness.root / "later").read_text() == "y\n"
    finally:
        for h in (first, second):
            if h._task is not None and not h._task.done():
                await h.stop()
