"""Supervised processes end to end: the real daemon, a real etcd, real processes (sleep, Python scripts)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from harness import Harness, eventually

from plans import ResourceKey
from reconciler.settings import AgentsSettings, ProcessAgentSettings
from tools.proc import boot_id, cmdline, identity

SLEEP = os.path.realpath("/usr/bin/sleep")
PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
async def procs(harness: Harness, tmp_path: Path) -> AsyncIterator[Harness]:
    """The harness, with the process agent allowed sleep and Python, its files under the test's directory; every
    process a test started is killed after it."""
    (tmp_path / "bin").mkdir()
    agents = AgentsSettings(
        file=harness.settings.agents.file,
        process=ProcessAgentSettings(
            allowed_executables=[SLEEP, PYTHON, str(tmp_path / "bin" / "*")], state_dir=str(tmp_path / "state"),
            log_dir=str(tmp_path / "logs"), poll_seconds=0.5,
        ),
    )  # fmt: skip
    harness.settings = harness.settings.model_copy(update={"agents": agents})
    try:
        yield harness
    finally:
        for pidfile in (tmp_path / "state").glob("*.pid"):
            pid = json.loads(pidfile.read_text())["pid"]
            found = identity(pid)
            if found is not None and found.session == pid:
                os.killpg(pid, signal.SIGKILL)


def napper(name: str, **spec: Any) -> tuple[dict[str, Any], list[str]]:
    """A sleep resource with argv unique to this test (so its processes can be counted), and that argv."""
    argv = [SLEEP, str(random.randint(100_000, 999_999))]
    return {"kind": "process", "name": name, "spec": {"command": argv, "start_seconds": 0.2, **spec}}, argv


def with_argv(argv: list[str]) -> list[int]:
    """The live (not zombie) processes running exactly `argv`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and cmdline(int(entry)) == argv:
            who = identity(int(entry))
            if who is not None and not who.zombie:
                found.append(int(entry))
    return found


async def status(h: Harness, name: str) -> dict[str, Any] | None:
    return await h.status(name, kind="process")


async def phase(h: Harness, name: str, wanted: str, *, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await status(h, name)
        ok = found is not None and found["phase"] == wanted and all(found.get(k) == v for k, v in fields.items())
        return found if ok else None

    result: dict[str, Any] = await eventually(check, timeout=timeout, what=f"process/{name} {wanted} {fields}")
    return result


async def one_running(argv: list[str], *, other_than: int | None = None) -> int:
    async def check() -> int | None:
        pids = await asyncio.to_thread(with_argv, argv)
        return pids[0] if len(pids) == 1 and pids[0] != other_than else None

    pid: int = await eventually(check, timeout=15, what=f"one process running {argv} (not {other_than})")
    return pid


async def test_a_killed_process_is_restarted_by_a_plan(procs: Harness) -> None:
    await procs.start()
    value, argv = napper("web")
    revision = await procs.put_desired(value)
    first = await phase(procs, "web", "Converged", observed_revision=revision)
    pid = await one_running(argv)
    record = await procs.plan_record(first["plan_id"])
    assert [(s["tool"], s["state"]) for s in record["steps"]] == [("process.start", "succeeded")]
    assert record["plan"]["risk"] == "low"

    os.kill(pid, signal.SIGKILL)
    replacement = await one_running(argv, other_than=pid)

    async def replanned() -> dict[str, Any] | None:
        found = await status(procs, "web")
        return found if found and found["phase"] == "Converged" and found["plan_id"] != first["plan_id"] else None

    second = await eventually(replanned, what="a new plan converged")
    assert "killed by SIGKILL" in (await procs.plan_record(second["plan_id"]))["plan"]["reasoning"]
    actual = await procs.store.get(procs.keys.actual(ResourceKey(kind="process", name="web")))
    assert actual is not None
    assert json.loads(actual.value)["state"]["pid"] == replacement


async def test_a_crash_loop_ends_failed_with_its_log_and_an_issue_until_the_issue_is_resolved(
    procs: Harness, tmp_path: Path
) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    script = (f"import os, sys, time\nif os.path.exists({str(flag)!r}):\n    print('boom: config is broken')\n"
              "    sys.exit(2)\ntime.sleep(300)\n")  # fmt: skip
    spec = {"command": [PYTHON, "-c", script, "loop"], "start_seconds": 0,
            "restart": {"base_seconds": 0.05, "cap_seconds": 0.2},
            "crash_loop": {"max_restarts": 2, "window_seconds": 120}}  # fmt: skip
    await procs.start()
    revision = await procs.put_desired({"kind": "process", "name": "loop", "spec": spec})

    failed = await phase(procs, "loop", "Failed", observed_revision=revision, timeout=30)
    assert "after 2 restarts within 120 s" in failed["message"]
    assert "boom: config is broken" in failed["message"]
    issue_key = procs.keys.issue(ResourceKey(kind="process", name="loop"), "crash-loop")
    kv = await procs.store.get(issue_key)
    assert kv is not None
    issue = json.loads(kv.value)
    assert issue["source"] == "process/loop" and "boom: config is broken" in issue["details"]["log"]
    assert issue["details"]["exit"] == {"code": 2, "signal": None}
    await asyncio.sleep(1.0)  # given up: nothing restarts it, however long it waits
    assert await asyncio.to_thread(with_argv, [PYTHON, "-c", script, "loop"]) == []
    assert (await status(procs, "loop") or {})["phase"] == "Failed"

    flag.unlink()  # the operator fixes the cause, then resolves the issue
    await procs.resolve_issue("loop", "crash-loop", kind="process")
    await phase(procs, "loop", "Converged", observed_revision=revision, timeout=20)
    await one_running([PYTHON, "-c", script, "loop"])


async def test_a_restarted_daemon_adopts_running_processes_without_duplicating_them(procs: Harness) -> None:
    await procs.start()
    value, argv = napper("db")
    revision = await procs.put_desired(value)
    converged = await phase(procs, "db", "Converged", observed_revision=revision)
    pid = await one_running(argv)

    assert await procs.stop() == 0
    assert await asyncio.to_thread(with_argv, argv) == [pid]  # it outlives the daemon
    await procs.start()
    await asyncio.sleep(1.0)  # a few polls of the new daemon
    assert await asyncio.to_thread(with_argv, argv) == [pid]
    assert (await status(procs, "db") or {})["plan_id"] == converged["plan_id"]  # adopted: no plan ran

    os.kill(pid, signal.SIGKILL)  # the adopted process is watched: its exit is seen at once
    await one_running(argv, other_than=pid)


async def test_a_pidfile_naming_a_reused_pid_is_not_adopted_and_its_process_is_spared(
    procs: Harness, tmp_path: Path
) -> None:
    stranger = await asyncio.create_subprocess_exec(SLEEP, "300")
    try:
        found = identity(stranger.pid)
        assert found is not None
        (tmp_path / "state").mkdir()
        forged = {
            "pid": stranger.pid, "start_time": found.start_time + 5, "boot_id": boot_id(), "command_hash": "x",
            "started_at": 0.0,
            "stop_signal": int(signal.SIGKILL), "stop_timeout_seconds": 1.0,
        }  # fmt: skip
        (tmp_path / "state" / "api.pid").write_text(json.dumps(forged))
        await procs.start()
        value, argv = napper("api")
        await procs.put_desired(value)
        await phase(procs, "api", "Converged")
        ours = await one_running(argv)
        assert ours != stranger.pid and stranger.returncode is None
    finally:
        stranger.kill()
        await stranger.wait()


async def test_deleting_the_desired_value_stops_the_process(procs: Harness) -> None:
    await procs.start()
    value, argv = napper("worker")
    await procs.put_desired(value)
    await phase(procs, "worker", "Converged")
    pid = await one_running(argv)
    await procs.store.delete(procs.keys.desired(ResourceKey(kind="process", name="worker")))

    async def gone() -> bool:
        return not await asyncio.to_thread(with_argv, argv) and await status(procs, "worker") is None

    await eventually(gone, what="the process stopped and its status removed")
    assert identity(pid) is None or identity(pid).zombie  # type: ignore[union-attr]


async def test_a_command_the_allowlist_refuses_is_invalid_even_through_a_symlink(
    procs: Harness, tmp_path: Path
) -> None:
    (tmp_path / "bin" / "innocent").symlink_to("/usr/bin/rm")  # inside an allowed glob, pointing out of it
    await procs.start()
    await procs.put_desired({"kind": "process", "name": "sneaky", "spec": {"command": [str(tmp_path / "bin" /
                                                                                         "innocent"), "-rf", "/x"]}})
    invalid = await phase(procs, "sneaky", "Invalid")
    assert "resolves to /usr/bin/rm" in invalid["message"]
    assert "agents.process.allowed_executables" in invalid["message"]
    await procs.put_desired({"kind": "process", "name": "plain", "spec": {"command": ["rm", "-rf", "/x"]}})
    assert "agents.process.allowed_executables" in (await phase(procs, "plain", "Invalid"))["message"]
