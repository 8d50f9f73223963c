"""File tools: `file.write`, `file.delete` and `file.read`.

Every tool re-checks that its path lies inside the allowed roots, whoever
planned the step: the agent checks first so a bad path is reported as an
invalid resource, and the tool checks again so no planner can get round it.

`file.write` is atomic: the content goes to a temporary file in the same
directory, is fsynced, gets its mode, and is renamed over the target; the
directory is fsynced after the rename. A reader sees the old file or the new
one, never a half-written one, and a crash leaves at most a stray temporary
file named `.<name>.setpoint-*`.

All file-system work, path confinement (`realpath`) included, runs in a
thread, never on the event loop; the rename or unlink that is a tool's effect
happens under a `Commit` (`tools/blocking.py`), so a call abandoned by its
timeout cannot land after a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plans import RiskLevel, Step
from plans.journal import MAX_UNDO_BYTES
from tools.base import CannotUndo, Tool, ToolContext, ToolResult
from tools.blocking import Commit, run_blocking
from tools.paths import PathNotAllowedError, confine

MODE_PATTERN = r"^0?[0-7]{3}$"
# Errors worth another try: the file system was busy or interrupted, not wrong.
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETXTBSY})


def _os_failure(action: str, target: Path, error: OSError) -> ToolResult:
    return ToolResult.failure(
        f"{action} {target} failed: {error.strerror or error}", retryable=error.errno in _TRANSIENT_ERRNOS
    )


def parse_mode(mode: str) -> int:
    """'0644' or '644' -> 0o644."""
    return int(mode, 8)


def format_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def stat_file(path: Path) -> dict[str, JsonValue]:
    """The observed state of a file: exists, sha256 of its content and mode; never follows a final symlink."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing, or a file where a directory should be
        return {"exists": False, "sha256": None, "mode": None}
    if not stat.S_ISREG(st.st_mode):
        return {"exists": True, "sha256": None, "mode": format_mode(st.st_mode)}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"exists": True, "sha256": digest.hexdigest(), "mode": format_mode(st.st_mode)}


class _PathParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Absolute path of the file, inside an allowed root.")


class WriteParams(_PathParams):
    content: str = Field(description="The whole content of the file, written as UTF-8.")
    mode: str = Field(default="0644", pattern=MODE_PATTERN, description="Octal permission bits, e.g. '0644'.")


class _FileTool(Tool):
    def __init__(self, *, allowed_roots: Sequence[str]) -> None:
        self._roots = tuple(allowed_roots)

    def _confine(self, path: str) -> Path:
        return confine(path, self._roots)

    def _make_parents(self, target: Path) -> None:
        # confine() already placed the (lexically resolved) parent inside a root.
        try:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # say which file stands where a directory should be
            for directory in reversed(target.parents):
                if os.path.lexists(directory) and not directory.is_dir():
                    message = f"{directory} is in the way: it is not a directory"
                    raise NotADirectoryError(errno.ENOTDIR, message) from None
            raise


def _restore(target: Path, *, what: str) -> Step | None:
    """The step that puts `target` back as it is now (read-only): a delete when it does not exist, else a write
    of its content and mode; CannotUndo when that content cannot be kept (too large, not UTF-8 text, not a
    regular file). Never follows a final symlink."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        if what == "delete":
            return None  # deleting what is not there changes nothing
        return Step(tool=FileDelete.name, parameters={"path": str(target)}, risk=FileDelete.risk,
                    description=f"delete {target}, which did not exist before")  # fmt: skip
    if not stat.S_ISREG(st.st_mode):
        raise CannotUndo(f"{target} is not a regular file")
    limit = MAX_UNDO_BYTES // 2  # the content, escaped in JSON, must fit in the journal's room for an inverse
    if st.st_size > limit:
        raise CannotUndo(f"the previous content of {target} ({st.st_size} bytes) is larger than the {limit} "
                         "bytes the journal keeps for an undo")  # fmt: skip
    with open(target, "rb") as f:
        data = f.read(limit + 1)
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CannotUndo(f"the previous content of {target} is not UTF-8 text") from None
    mode = format_mode(st.st_mode)
    return Step(
        tool=FileWrite.name, parameters={"path": str(target), "content": content, "mode": mode},
        risk=FileWrite.risk, description=f"restore the previous content and mode ({mode}) of {target}",
    )  # fmt: skip


class FileWrite(_FileTool):
    name: ClassVar[str] = "file.write"
    description: ClassVar[str] = "Atomically write a file's whole content and set its mode."
    parameters: ClassVar[type[BaseModel]] = WriteParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 30.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, WriteParams)
        return await run_blocking(lambda commit: self._write(params, commit))

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, WriteParams)
        try:
            state = await asyncio.to_thread(lambda: stat_file(self._confine(params.path)))
        except (PathNotAllowedError, OSError):
            return None
        want = hashlib.sha256(params.content.encode("utf-8")).hexdigest()
        return state["sha256"] == want and state["mode"] == f"{parse_mode(params.mode):04o}"

    async def inverse(self, params: BaseModel, ctx: ToolContext) -> Step | None:
        assert isinstance(params, WriteParams)
        return await asyncio.to_thread(lambda: _restore(self._confine(params.path), what="write"))

    def _write(self, params: WriteParams, commit: Commit) -> ToolResult:
        try:
            target = self._confine(params.path)
        except PathNotAllowedError as e:
            return ToolResult.failure(str(e))
        try:
            digest = self._replace(target, params.content.encode("utf-8"), parse_mode(params.mode), commit)
        except OSError as e:
            return _os_failure("writing", target, e)
        return ToolResult.success(path=str(target), sha256=digest, mode=params.mode.zfill(4))

    def _replace(self, target: Path, data: bytes, mode: int, commit: Commit) -> str:
        self._make_parents(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.setpoint-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
            with commit():
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(target.parent)
        return hashlib.sha256(data).hexdigest()


class FileDelete(_FileTool):
    name: ClassVar[str] = "file.delete"
    description: ClassVar[str] = "Delete a file. Deleting a file that does not exist succeeds."
    parameters: ClassVar[type[BaseModel]] = _PathParams
    risk: ClassVar[RiskLevel] = RiskLevel.HIGH
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 30.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, _PathParams)
        return await run_blocking(lambda commit: self._delete(params.path, commit))

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, _PathParams)
        try:
            return not await asyncio.to_thread(lambda: os.path.lexists(self._confine(params.path)))
        except (PathNotAllowedError, OSError):
            return None

    async def inverse(self, params: BaseModel, ctx: ToolContext) -> Step | None:
        assert isinstance(params, _PathParams)
        return await asyncio.to_thread(lambda: _restore(self._confine(params.path), what="delete"))

    def _delete(self, path: str, commit: Commit) -> ToolResult:
        try:
            target = self._confine(path)
        except PathNotAllowedError as e:
            return ToolResult.failure(str(e))
        try:
            with commit():
                os.unlink(target)
        except FileNotFoundError:
            return ToolResult.success(path=str(target), existed=False)
        except OSError as e:
            return _os_failure("deleting", target, e)
        with contextlib.suppress(OSError):  # the file is gone; a failed directory fsync does not undo that
            _fsync_dir(target.parent)
        return ToolResult.success(path=str(target), existed=True)


class FileRead(_FileTool):
    name: ClassVar[str] = "file.read"
    description: ClassVar[str] = "Report whether a file exists, its sha256 and its mode."
    parameters: ClassVar[type[BaseModel]] = _PathParams
    risk: ClassVar[RiskLevel] = RiskLevel.READ_ONLY
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 30.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, _PathParams)
        return await asyncio.to_thread(self._read, params.path)

    def _read(self, path: str) -> ToolResult:
        try:
            target = self._confine(path)
        except PathNotAllowedError as e:
            return ToolResult.failure(str(e))
        try:
            state = stat_file(target)
        except OSError as e:
            return _os_failure("reading", target, e)
        if not state["exists"]:
            return ToolResult.no_data(path=str(target), **state)
        return ToolResult.success(path=str(target), **state)


def file_tools(*, allowed_roots: Sequence[str]) -> list[Tool]:
    return [
        FileWrite(allowed_roots=allowed_roots),
        FileDelete(allowed_roots=allowed_roots),
        FileRead(allowed_roots=allowed_roots),
    ]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
