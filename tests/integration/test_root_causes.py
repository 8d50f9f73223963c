"""When a resource cannot converge, its status says why: the real error, or the resource it fights with."""

from __future__ import annotations

import asyncio
import json

from harness import DELETES_RUN, Harness, eventually, make_settings

from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import Section
from reconciler.store import Delete, Put


async def test_a_failing_plan_keeps_its_error_when_the_flap_guard_stops_it(harness: Harness) -> None:
    harness.use_policies({"limits": {"flap_max_plans": 2}})
    (harness.root / "not-a-dir").write_text("")  # every write under it fails
    await harness.start()

    await harness.put_desired(harness.resource("stuck", "x\n", path=str(harness.root / "not-a-dir" / "stuck")))

    status = await harness.wait_status("stuck", "Blocked")
    assert "flap guard" in status["message"]
    assert "not-a-dir is in the way: it is not a directory" in status["message"], status["message"]
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



async def test_a_renamed_resource_hands_its_file_over_instead_of_deleting_it(
    harness: Harness, etcd: EmbeddedEtcd
) -> None:
    harness.settings = make_settings(etcd, harness.keys.prefix, harness.root, policies=DELETES_RUN)  # deletes run
    await harness.start()
    path = str(harness.root / "app.conf")
    await harness.put_desired(harness.resource("old-name", "conf\n", path=path))
    await harness.wait_status("old-name", "Converged")

    new = harness.resource("new-name", "conf\n", path=path)
    await harness.store.txn(  # the rename, as one change
        then=[Delete(harness.keys.desired(harness.daemon_key("old-name"))),
              Put(harness.keys.desired(harness.daemon_key("new-name")), json.dumps(new).encode())]
    )  # fmt: skip

    await harness.wait_status("new-name", "Converged")

    async def old_gone() -> bool:
        return await harness.status("old-name") is None

    await eventually(old_gone, what="the old name to be forgotten")
    plans, _ = await harness.store.get_prefix(harness.keys.section(Section.PLANS))
    tools = [s["tool"] for kv in plans for s in json.loads(kv.value)["plan"]["steps"]]
    assert "file.delete" not in tools, "the old name's teardown would delete the file the new name manages"
    assert (harness.root / "app.conf").read_text() == "conf\n"
