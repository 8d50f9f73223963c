"""When a resource cannot converge, its status says why: the real error, or the resource it fights with."""

from __future__ import annotations

import asyncio
import json

from harness import Harness

from reconciler.settings import LimitsSettings


async def test_a_failing_plan_keeps_its_error_when_the_flap_guard_stops_it(harness: Harness) -> None:
    harness.settings = harness.settings.model_copy(update={"limits": LimitsSettings(flap_max_plans=2)})
    (harness.root / "adir").mkdir()  # the wanted path is a directory: every write fails
    await harness.start()

    await harness.put_desired(harness.resource("adir", "x\n"))

    status = await harness.wait_status("adir", "Blocked")
    assert "flap guard" in status["message"]
    assert "Is a directory" in status["message"], status["message"]
    assert "keeps undoing" not in status["message"], "a plan that failed was not undone by anything"


async def test_two_resources_that_claim_one_file_are_both_invalid_and_name_each_other(running: Harness) -> None:
    path = str(running.root / "shared.conf")
    a, b = running.resource("a", "from a\n", path=path), running.resource("b", "from b\n", path=path)
    await running.store.put_all(
        [(running.keys.desired(running.daemon_key(r["name"])), _json(r)) for r in (a, b)]
    )

    status_a = await running.wait_status("a", "Invalid")
    status_b = await running.wait_status("b", "Invalid")
    assert "file/b" in status_a["message"] and path in status_a["message"], status_a["message"]
    assert "file/a" in status_b["message"] and path in status_b["message"], status_b["message"]
    await asyncio.sleep(0.5)
    assert not (running.root / "shared.conf").exists(), "neither may write a file both claim"

    revision = await running.put_desired(running.resource("b", "from b\n", path=str(running.root / "b.conf")))

    await running.wait_status("b", "Converged", revision=revision)
    await running.wait_status("a", "Converged")
    assert (running.root / "shared.conf").read_text() == "from a\n"


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()

