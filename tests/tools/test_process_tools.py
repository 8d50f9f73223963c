"""process.start, process.stop, process.restart and process.logs, run for real: real processes, /proc, pidfds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plans import ResourceKey
from tools import ToolContext, ToolStatus
from tools.blocking import Abandoned, Commit
from tools.builtin.process import LogsParams, NameParams, ProcessLogs, ProcessRestart, ProcessStart, ProcessStop
from tools.proc import boot_id, cmdline, identity
from tools.process_table import ExecutableNotAllowed, Launch, ProcessTable, resolve_executable

SLEEP = os.path.realpath("/usr/bin/sleep")
PYTHON = os.path.realpath(sys.executable)


def ctx(name: str, plan: str = "p1", step: int = 0) -> ToolContext:
    return ToolContext(plan_id=plan, resource=ResourceKey(kind="process", name=name), step_index=step)


def launch(name: str, *argv: str, start_seconds: float = 0.0, stop_timeout: float = 5.0, **more: object) -> Launch:
    fields: dict[str, object] = {
        "name": name, "argv": argv, "env": {}, "cwd": "/", "user": None, "stop_signal": int(signal.SIGTERM),
        "stop_timeout_seconds": stop_timeout, "start_seconds": start_seconds, "log_max_bytes": 1 << 20,
        "log_backups": 2, "window_seconds": 300.0, **more,
    }  # fmt: skip
    return Launch(**fields)  # type: ignore[arg-type]


def running(pid: int) -> bool:
    found = identity(pid)
    return found is not None and not found.zombie


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[ProcessTable]:
    t = ProcessTable(state_dir=tmp_path / "state", log_dir=tmp_path / "logs", allowed_executables=[SLEEP, PYTHON])
    yield t
    t.close()
    for pidfile in (tmp_path / "state").glob("*.pid"):  # nothing a test started outlives it
        pid = json.loads(pidfile.read_text())["pid"]
        if running(pid):
            os.killpg(pid, signal.SIGKILL)


async def until(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {check}"
        await asyncio.sleep(0.02)


async def test_start_runs_the_process_once_and_stop_ends_it(table: ProcessTable) -> None:
    table.register(launch("napper", SLEEP, "300"))
    started = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert started.status is ToolStatus.SUCCESS, started.error
    pid = started.output["pid"]
    assert isinstance(pid, int) and running(pid)
    await until(lambda: cmdline(pid) == [SLEEP, "300"])  # exec'd: empty for an instant after Popen returns
    assert os.getsid(pid) == pid  # a session of its own: it outlives the daemon, and a stop reaches its group
    again = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert again.output == {"pid": pid, "already_running": True}
    assert await ProcessStart(table=table).verify(NameParams(name="napper"), ctx("napper")) is True

    stopped = await ProcessStop(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert stopped.status is ToolStatus.SUCCESS and stopped.output["stopped_pid"] == pid
    assert not running(pid)
    assert await ProcessStop(table=table).verify(NameParams(name="napper"), ctx("napper")) is True
    twice = await ProcessStop(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert twice.status is ToolStatus.SUCCESS and twice.output["stopped_pid"] is None


async def test_a_process_that_exits_within_start_seconds_fails_the_start_with_its_last_lines(
    table: ProcessTable,
) -> None:
    table.register(launch("broken", PYTHON, "-c", "print('cannot bind :8080'); raise SystemExit(3)",
                          start_seconds=5.0))  # fmt: skip
    result = await ProcessStart(table=table).execute(NameParams(name="broken"), ctx("broken"))
    assert result.status is ToolStatus.ERROR
    assert result.error is not None
    assert "exited with code 3" in result.error and "cannot bind :8080" in result.error


async def test_the_exit_of_a_watched_process_is_reported_at_once_with_how_it_ended(table: ProcessTable) -> None:
    heard: list[str] = []
    table.subscribe(heard.append)
    table.register(launch("napper", SLEEP, "300"))
    started = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    pid = started.output["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: heard == ["napper"])
    seen = await asyncio.to_thread(table.observe, launch("napper", SLEEP, "300"))
    assert not seen.running
    assert seen.history.last_exit is not None and seen.history.last_exit.signal == "SIGKILL"
    assert identity(pid) is None  # reaped: no zombie left behind


async def test_a_pidfile_naming_someone_elses_process_is_never_taken_for_ours(
    table: ProcessTable, tmp_path: Path
) -> None:
    """A live pid with another start time (the pid was reused) is not running for us, and a stop spares it."""
    stranger = await asyncio.create_subprocess_exec(SLEEP, "300")
    try:
        found = identity(stranger.pid)
        assert found is not None
        (tmp_path / "state").mkdir()
        forged = {
            "pid": stranger.pid, "start_time": found.start_time - 1, "boot_id": boot_id(), "command_hash": "x",
            "started_at": 0.0, "stop_signal": int(signal.SIGKILL), "stop_timeout_seconds": 1.0,
        }  # fmt: skip
        (tmp_path / "state" / "napper.pid").write_text(json.dumps(forged))
        seen = await asyncio.to_thread(table.observe, launch("napper", SLEEP, "300"))
        assert not seen.running
        await ProcessStop(table=table).execute(NameParams(name="napper"), ctx("napper"))
        assert stranger.returncode is None and running(stranger.pid)

        (tmp_path / "state" / "other.pid").write_text(json.dumps({**forged, "start_time": found.start_time,
                                                                   "boot_id": "another-boot"}))  # fmt: skip
        seen = await asyncio.to_thread(table.observe, launch("other", SLEEP, "300"))
        assert not seen.running
    finally:
        stranger.kill()
        await stranger.wait()


async def test_stop_escalates_to_sigkill_for_a_process_that_ignores_its_stop_signal(table: ProcessTable) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
             "time.sleep(300)"  # fmt: skip
    table.register(launch("stubborn", PYTHON, "-c", script, stop_timeout=0.3))
    started = await ProcessStart(table=table).execute(NameParams(name="stubborn"), ctx("stubborn"))
    pid = started.output["pid"]
    assert isinstance(pid, int)
    await until(lambda: table.last_lines("stubborn", 1) == ["ready"])  # its handler is in place
    await ProcessStop(table=table).execute(NameParams(name="stubborn"), ctx("stubborn"))
    assert not running(pid)


async def test_restart_replaces_the_process_and_verify_knows_which_step_started_it(table: ProcessTable) -> None:
    table.register(launch("napper", SLEEP, "300"))
    first = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper", "p1"))
    restarted = await ProcessRestart(table=table).execute(NameParams(name="napper"), ctx("napper", "p2", 1))
    assert restarted.status is ToolStatus.SUCCESS, restarted.error
    assert restarted.output["pid"] != first.output["pid"]
    assert isinstance(first.output["pid"], int) and not running(first.output["pid"])
    restart = ProcessRestart(table=table)
    assert await restart.verify(NameParams(name="napper"), ctx("napper", "p2", 1)) is True
    assert await restart.verify(NameParams(name="napper"), ctx("napper", "p3", 0)) is False


async def test_an_executable_the_allowlist_refuses_is_never_run_even_when_registered(tmp_path: Path) -> None:
    """A launch registered under one allowlist (or a binary swapped behind a symlink since) is checked again."""
    table = ProcessTable(state_dir=tmp_path / "state", log_dir=tmp_path / "logs", allowed_executables=[PYTHON])
    table.register(launch("napper", SLEEP, "300"))
    result = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert result.status is ToolStatus.ERROR
    assert result.error is not None and "agents.process.allowed_executables" in result.error
    assert not (tmp_path / "state" / "napper.pid").exists()
    restart = await ProcessRestart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    assert restart.status is ToolStatus.ERROR
    unknown = await ProcessStart(table=table).execute(NameParams(name="nobody"), ctx("nobody"))
    assert unknown.status is ToolStatus.ERROR and "not a process resource" in (unknown.error or "")


def test_executables_are_resolved_then_matched(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sub").mkdir()
    link = bin_dir / "nap"
    link.symlink_to(SLEEP)
    nested = bin_dir / "sub" / "tool"
    nested.write_text("#!/bin/sh\n")
    nested.chmod(0o755)
    assert resolve_executable("sleep", path="/usr/bin", patterns=[SLEEP]) == SLEEP
    assert resolve_executable(str(link), path=None, patterns=[SLEEP]) == SLEEP
    with pytest.raises(ExecutableNotAllowed, match="does not allow"):  # a symlink inside an allowed glob
        resolve_executable(str(link), path=None, patterns=[f"{bin_dir}/*"])
    with pytest.raises(ExecutableNotAllowed, match="does not allow"):  # `*` does not cross a `/`
        resolve_executable(str(nested), path=None, patterns=[f"{bin_dir}/*"])
    assert resolve_executable(str(nested), path=None, patterns=[f"{bin_dir}/*/*"]) == str(nested.resolve())
    with pytest.raises(ExecutableNotAllowed, match="is empty: every command is refused"):
        resolve_executable(SLEEP, path=None, patterns=[])
    with pytest.raises(ExecutableNotAllowed, match="not found on PATH"):
        resolve_executable("no-such-program-here", path=str(tmp_path), patterns=["/*"])
    with pytest.raises(ExecutableNotAllowed, match="absolute path or a bare name"):
        resolve_executable("bin/nap", path=None, patterns=["/*"])


async def test_logs_are_rotated_by_copy_and_truncate_and_tailed(table: ProcessTable, tmp_path: Path) -> None:
    script = "import sys\nfor i in range(3000): print(f'line {i:05d} ' + 'x' * 40)\nsys.stdout.flush()\n" \
             "import time; time.sleep(300)"  # fmt: skip
    spec = launch("chatty", PYTHON, "-c", script, log_max_bytes=64 * 1024)
    table.register(spec)
    await ProcessStart(table=table).execute(NameParams(name="chatty"), ctx("chatty"))
    await until(lambda: table.last_lines("chatty", 1) == [f"line 02999 {'x' * 40}"])
    seen = await asyncio.to_thread(table.observe, spec)
    assert seen.running
    log = tmp_path / "logs" / "chatty.log"
    assert log.stat().st_size == 0
    assert (tmp_path / "logs" / "chatty.log.1").read_text().splitlines()[-1].startswith("line 02999")

    logs = await ProcessLogs(table=table).execute(LogsParams(name="chatty", lines=5), ctx("chatty"))
    assert logs.status is ToolStatus.NO_DATA  # everything went to the rotated copy
    log.write_text("one\ntwo\nthree\n")
    logs = await ProcessLogs(table=table).execute(LogsParams(name="chatty", lines=2), ctx("chatty"))
    assert logs.output["lines"] == ["two", "three"]


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
async def test_a_process_runs_as_its_user_with_that_users_groups(table: ProcessTable) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    table.register(launch("napper", SLEEP, "300", user="nobody"))
    started = await ProcessStart(table=table).execute(NameParams(name="napper"), ctx("napper"))
    pid = started.output["pid"]
    status = await asyncio.to_thread(Path(f"/proc/{pid}/status").read_text)
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
    assert gid_line.split()[1:] == [str(nobody.pw_gid)] * 4


async def test_an_abandoned_start_runs_nothing(table: ProcessTable) -> None:
    spec = launch("napper", SLEEP, "300")
    table.register(spec)
    commit = Commit()
    commit.abandon()
    with pytest.raises(Abandoned):
        await asyncio.to_thread(table.start, spec, started_by="p/0", commit=commit)
    pf, is_running = table.current("napper")
    assert pf is None and not is_running
