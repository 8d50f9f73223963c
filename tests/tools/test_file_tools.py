"""file.write, file.delete and file.read, run for real against a temporary directory."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from plans import ResourceKey
from tools import ToolContext, ToolResult, ToolStatus
from tools.builtin.files import FileDelete, FileRead, FileWrite, WriteParams, _PathParams, stat_file

CTX = ToolContext(plan_id="p1", resource=ResourceKey(kind="file", name="motd"), step_index=0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    return Path(os.path.realpath(tmp_path / "root"))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def write(root: Path, path: str, content: str, mode: str = "0644") -> ToolResult:
    return await FileWrite(allowed_roots=[str(root)]).execute(WriteParams(path=path, content=content, mode=mode), CTX)


@pytest.mark.parametrize(("mode", "bits"), [("0600", 0o600), ("0755", 0o755), ("0640", 0o640), ("644", 0o644)])
async def test_write_creates_parents_and_sets_content_and_mode_exactly(root: Path, mode: str, bits: int) -> None:
    target = root / "etc" / "app" / "motd"
    result = await FileWrite(allowed_roots=[str(root)]).execute(
        WriteParams(path=str(target), content="héllo\n", mode=mode), CTX
    )
    assert result.status is ToolStatus.SUCCESS, result.error
    assert target.read_bytes() == "héllo\n".encode()
    assert mode_of(target) == bits
    assert result.output == {
        "path": str(target),
        "sha256": hashlib.sha256("héllo\n".encode()).hexdigest(),
        "mode": f"{bits:04o}",
    }
    assert os.listdir(target.parent) == ["motd"]


async def test_write_replaces_an_existing_file_atomically(root: Path) -> None:
    target = root / "motd"
    await write(root, str(target), "old\n", "0644")
    reader = os.open(target, os.O_RDONLY)
    try:
        result = await write(root, str(target), "new\n", "0600")
        # A reader of the old file still sees all of it: the new content arrived by rename.
        assert os.read(reader, 100) == b"old\n"
    finally:
        os.close(reader)
    assert result.status is ToolStatus.SUCCESS
    assert target.read_text() == "new\n"
    assert mode_of(target) == 0o600
    assert os.listdir(root) == ["motd"]


async def test_write_failure_reports_an_error_and_leaves_no_temporary_file(root: Path) -> None:
    (root / "motd").mkdir()
    result = await FileWrite(allowed_roots=[str(root)]).execute(WriteParams(path=str(root / "motd"), content="x"), CTX)
    assert result.status is ToolStatus.ERROR
    assert result.error and "motd" in result.error
    assert os.listdir(root) == ["motd"]
    assert (root / "motd").is_dir()


@pytest.mark.parametrize("tail", ["../outside/motd", "link/motd"])
async def test_write_outside_the_roots_is_an_error_and_writes_nothing(root: Path, tmp_path: Path, tail: str) -> None:
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    result = await FileWrite(allowed_roots=[str(root)]).execute(WriteParams(path=f"{root}/{tail}", content="x"), CTX)
    assert result.status is ToolStatus.ERROR
    assert result.error and "outside the allowed roots" in result.error
    assert os.listdir(tmp_path / "outside") == []


async def test_write_through_a_final_symlink_is_an_error_and_leaves_the_target_alone(
    root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "outside" / "victim"
    victim.write_text("keep\n")
    (root / "motd").symlink_to(victim)
    result = await FileWrite(allowed_roots=[str(root)]).execute(WriteParams(path=str(root / "motd"), content="x"), CTX)
    assert result.status is ToolStatus.ERROR
    assert result.error and "symbolic link" in result.error
    assert victim.read_text() == "keep\n"
    assert (root / "motd").is_symlink()


async def test_delete_removes_an_existing_file(root: Path) -> None:
    (root / "motd").write_text("x")
    result = await FileDelete(allowed_roots=[str(root)]).execute(_PathParams(path=str(root / "motd")), CTX)
    assert result.status is ToolStatus.SUCCESS
    assert result.output["existed"] is True
    assert not (root / "motd").exists()


async def test_delete_of_a_missing_file_succeeds_and_says_it_did_not_exist(root: Path) -> None:
    result = await FileDelete(allowed_roots=[str(root)]).execute(_PathParams(path=str(root / "gone")), CTX)
    assert result.status is ToolStatus.SUCCESS
    assert result.output["existed"] is False


async def test_delete_outside_the_roots_is_an_error_and_deletes_nothing(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "outside" / "victim"
    victim.write_text("keep\n")
    (root / "ln").symlink_to(victim)
    tool = FileDelete(allowed_roots=[str(root)])
    for path in (f"{root}/../outside/victim", str(root / "ln")):
        result = await tool.execute(_PathParams(path=path), CTX)
        assert result.status is ToolStatus.ERROR
        assert result.error
    assert victim.read_text() == "keep\n"
    assert (root / "ln").is_symlink()


async def test_read_reports_content_hash_and_mode(root: Path) -> None:
    target = root / "motd"
    target.write_text("hello\n")
    target.chmod(0o640)
    result = await FileRead(allowed_roots=[str(root)]).execute(_PathParams(path=str(target)), CTX)
    assert result.status is ToolStatus.SUCCESS
    assert result.output["exists"] is True
    assert result.output["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    assert result.output["mode"] == "0640"


async def test_read_of_a_missing_file_is_no_data(root: Path) -> None:
    result = await FileRead(allowed_roots=[str(root)]).execute(_PathParams(path=str(root / "gone")), CTX)
    assert result.status is ToolStatus.NO_DATA
    assert result.ok
    assert result.output["exists"] is False
    assert result.output["sha256"] is None


async def test_read_outside_the_roots_is_an_error(root: Path, tmp_path: Path) -> None:
    (tmp_path / "outside" / "secret").write_text("x")
    result = await FileRead(allowed_roots=[str(root)]).execute(_PathParams(path=f"{root}/../outside/secret"), CTX)
    assert result.status is ToolStatus.ERROR
    assert not result.ok
    assert "sha256" not in result.output


async def test_a_write_abandoned_by_its_timeout_never_lands_after_a_newer_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor's timeout cancels the await, not the thread doing the write: the late
    rename of the older content must not land over what a newer write put there."""
    import asyncio
    import threading

    target = root / "conf"
    slow = threading.Event()
    slow.set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if slow.is_set():
            threading.Event().wait(0.4)  # a disk that stalls, in the worker thread only
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tool = FileWrite(allowed_roots=[str(root)])

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await tool.execute(WriteParams(path=str(target), content="old\n"), CTX)
    slow.clear()
    newer = await tool.execute(WriteParams(path=str(target), content="new\n"), CTX)
    assert newer.status is ToolStatus.SUCCESS, newer.error
    await asyncio.sleep(0.8)  # long enough for the abandoned thread to finish whatever it would do

    assert target.read_text() == "new\n"
    assert os.listdir(root) == ["conf"], "the abandoned write left its temporary file behind"


async def test_a_timeout_during_a_hung_rename_does_not_block_the_event_loop(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung file system (say a hard NFS mount) stalls the rename the timeout fires during: the
    event loop must go on serving everything else, and the timed-out call must still not return
    while its rename may yet land."""
    import asyncio
    import threading

    entered, release = threading.Event(), threading.Event()
    real_replace = os.replace

    def hung_replace(src: str, dst: str) -> None:
        entered.set()
        release.wait(10)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", hung_replace)
    unblock = threading.Timer(3.0, release.set)  # if the loop is blocked, only this frees it
    unblock.start()
    try:

        async def write() -> ToolResult:
            async with asyncio.timeout(0.05):
                return await FileWrite(allowed_roots=[str(root)]).execute(
                    WriteParams(path=str(root / "conf"), content="x\n"), CTX
                )

        call = asyncio.create_task(write())
        await asyncio.to_thread(entered.wait, 5)  # the rename is under way, and hangs
        await asyncio.sleep(0.3)  # the timeout fires meanwhile

        assert not release.is_set(), "the event loop stood still until the hung rename ended"
        assert not call.done(), "the timed-out call returned while its rename could still land"
        release.set()
        with pytest.raises(TimeoutError):
            await call
    finally:
        release.set()
        unblock.cancel()


async def test_a_file_where_a_directory_should_be_is_observed_as_missing_and_named_when_writing(root: Path) -> None:
    (root / "etc").write_text("a file, not a directory\n")
    target = root / "etc" / "motd"

    assert stat_file(target) == {"exists": False, "sha256": None, "mode": None}
    result = await write(root, str(target), "x\n")

    assert result.status is ToolStatus.ERROR
    assert result.error == f"writing {target} failed: {root / 'etc'} is in the way: it is not a directory"
