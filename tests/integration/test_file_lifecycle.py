"""The walking skeleton end to end: desired files in a real etcd become files on disk."""

from __future__ import annotations

import asyncio
import os
import stat

from harness import DELETES_RUN, POLL_SECONDS, Harness, eventually, make_settings


def _mode(path: os.PathLike[str] | str) -> str:
    return f"{stat.S_IMODE(os.stat(path).st_mode):04o}"


async def test_applied_file_converges_with_content_mode_and_journal(running: Harness) -> None:
    revision = await running.put_desired(running.resource("motd", "hello\n", mode="0640"))

    status = await running.wait_status("motd", "Converged", revision=revision)

    target = running.root / "motd"
    assert target.read_text() == "hello\n"
    assert _mode(target) == "0640"
    assert status["plan_id"], status
    record = await running.plan_record(status["plan_id"])
    assert record["state"] == "succeeded"
    assert record["decision"] == "auto"
    assert [(s["tool"], s["state"]) for s in record["steps"]] == [("file.write", "succeeded")]
    assert record["steps"][0]["started_at"] and record["steps"][0]["finished_at"]
    assert record["plan"]["desired_revision"] == revision
    assert record["plan"]["risk"] == "low"
    leftovers = [p.name for p in running.root.iterdir() if p.name != "motd"]
    assert leftovers == [], "atomic write left temporary files behind"


async def test_hand_edit_is_healed_within_the_poll_interval(running: Harness) -> None:
    revision = await running.put_desired(running.resource("conf", "wanted\n"))
    first = await running.wait_status("conf", "Converged", revision=revision)
    target = running.root / "conf"

    target.write_text("tampered\n")
    os.chmod(target, 0o666)

    async def healed() -> bool:
        return target.read_text() == "wanted\n" and _mode(target) == "0644"

    await eventually(healed, timeout=POLL_SECONDS * 20, what="hand edit healed")
    status = await running.wait_status("conf", "Converged", revision=revision)
    assert status["plan_id"] != first["plan_id"], "healing should have run a new plan"


async def test_changed_desired_content_is_rewritten(running: Harness) -> None:
    await running.put_desired(running.resource("app", "v1\n"))
    await running.wait_status("app", "Converged")

    revision = await running.put_desired(running.resource("app", "v2\n", mode="0600"))

    await running.wait_status("app", "Converged", revision=revision)
    assert (running.root / "app").read_text() == "v2\n"
    assert _mode(running.root / "app") == "0600"


async def test_deleted_desired_awaits_approval_and_file_kept(running: Harness) -> None:
    await running.put_desired(running.resource("keep", "data\n"))
    await running.wait_status("keep", "Converged")

    await running.store.delete(running.keys.desired(running.daemon_key("keep")))

    status = await running.wait_status("keep", "AwaitingApproval")
    assert "awaiting approval" in status["message"], status
    assert "risk high" in status["message"], status
    assert "delete" in status["message"], status
    # Give the workers time to do something wrong if they were going to.
    await asyncio.sleep(POLL_SECONDS * 5)
    assert (running.root / "keep").read_text() == "data\n"
    assert (await running.status("keep"))["phase"] == "AwaitingApproval"


async def test_path_outside_allowed_roots_is_invalid_and_nothing_written(running: Harness, tmp_path) -> None:
    outside = tmp_path / "outside" / "file"
    escape = running.root / ".." / "escaped"
    link = running.root / "link"
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere")

    cases = {
        "outside": str(outside),
        "dotdot": str(escape),
        "symlinked": str(link / "file"),
        "relative": "relative/file",
    }
    revisions = {}
    for name, path in cases.items():
        revisions[name] = await running.put_desired(running.resource(name, "x", path=path))

    for name in cases:
        status = await running.wait_status(name, "Invalid", revision=revisions[name])
        assert "spec.path" in status["message"], status
    assert not outside.exists()
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "elsewhere" / "file").exists()
    assert not (running.root / "relative").exists()


async def test_invalid_values_are_invalid_and_everything_else_converges(running: Harness) -> None:
    bad = {
        "notjson": b"{this is not json",
        "notutf8": b'{"kind": "file", "name": "notutf8", "spec": {"x": "\xff\xfe"}}',
        "notobject": b"[1, 2, 3]",
        "mismatch": b'{"kind": "file", "name": "other", "spec": {"path": "/x", "content": ""}}',
        "wrongtype": b'{"kind": "file", "name": "wrongtype", "spec": {"path": 5, "content": "x"}}',
        "nospec": b'{"kind": "file", "name": "nospec"}',
        "badmode": b'{"kind": "file", "name": "badmode", "spec": {"path": "/tmp/x", "content": "", "mode": "999"}}',
    }
    for name, raw in bad.items():
        await running.put_desired(raw, name=name)
    good = {f"good{i}": f"content {i}\n" for i in range(5)}
    for name, content in good.items():
        await running.put_desired(running.resource(name, content))

    for name in bad:
        status = await running.wait_status(name, "Invalid")
        assert status["message"], f"{name} has no reason"
    for name, content in good.items():
        await running.wait_status(name, "Converged")
        assert (running.root / name).read_text() == content
    reasons = {name: (await running.status(name))["message"] for name in bad}
    assert "not valid JSON" in reasons["notjson"]
    assert "UTF-8" in reasons["notutf8"]
    assert "stored under file/mismatch" in reasons["mismatch"]
    assert "spec.path" in reasons["wrongtype"]
    assert "'spec' is required" in reasons["nospec"]
    assert "spec.mode" in reasons["badmode"]


async def test_invalid_value_fixed_later_converges(running: Harness) -> None:
    await running.put_desired(b"garbage", name="later")
    await running.wait_status("later", "Invalid")

    revision = await running.put_desired(running.resource("later", "fixed\n"))

    await running.wait_status("later", "Converged", revision=revision)
    assert (running.root / "later").read_text() == "fixed\n"


async def test_unknown_kind_is_invalid(running: Harness) -> None:
    await running.put_desired({"kind": "service", "name": "nginx", "spec": {}})

    status = await eventually(lambda: running.status("nginx", kind="service"), what="status of service/nginx")

    assert status["phase"] == "Invalid"
    assert "no agent handles kind 'service'" in status["message"]


async def test_metrics_and_health_endpoints(running: Harness) -> None:
    import aiohttp

    await running.put_desired(running.resource("metered", "m\n"))
    await running.wait_status("metered", "Converged")
    assert running.daemon is not None
    base = f"http://127.0.0.1:{running.daemon.http_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/readyz") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    for name in (
        "setpoint_events_total",
        'setpoint_reconcile_total{kind="file",result="converged"}',
        "setpoint_reconcile_duration_seconds_bucket",
        "setpoint_workqueue_depth",
        'setpoint_plan_steps_total{result="success",tool="file.write"}',
    ):
        assert name in text, f"{name} missing from /metrics"


async def test_deleting_an_invalid_value_removes_its_status(running: Harness) -> None:
    await running.put_desired(b"not json", name="junk")
    await running.wait_status("junk", "Invalid")

    await running.store.delete(running.keys.desired(running.daemon_key("junk")))

    async def gone() -> bool:
        return await running.status("junk") is None

    await eventually(gone, what="status of a deleted invalid resource to be removed")


async def _converge_then_delete_while_down(h: Harness, name: str) -> None:
    await h.start()
    await h.put_desired(h.resource(name, "bye\n"))
    await h.wait_status(name, "Converged")
    assert await h.stop() == 0
    await h.store.delete(h.keys.desired(h.daemon_key(name)))
    await h.store.compact(await h.store.ping())  # no history left to find the deleted value in


async def test_deletion_while_down_and_compacted_still_awaits_approval_after_restart(harness: Harness) -> None:
    await _converge_then_delete_while_down(harness, "offline")

    await harness.start()

    status = await harness.wait_status("offline", "AwaitingApproval")
    assert "delete" in status["message"]
    assert (harness.root / "offline").exists()


async def test_deletion_while_down_is_carried_out_when_policy_allows(harness: Harness, etcd) -> None:
    await _converge_then_delete_while_down(harness, "remove-me")
    harness.settings = make_settings(etcd, harness.keys.prefix, harness.root, policies=DELETES_RUN)

    await harness.start()

    async def removed() -> bool:
        return not (harness.root / "remove-me").exists() and await harness.status("remove-me") is None

    await eventually(removed, what="file and status removed")
    assert await harness.store.get(harness.keys.actual(harness.daemon_key("remove-me"))) is None
