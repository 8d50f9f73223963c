"""`kind: command` tools: one program run with an argv built from the step's parameters, never through a shell.

The program is resolved and checked against `tools.allowed_executables`
again at every run (`executables.py`). It runs in a new session, so its
whole process group can be killed; stdin is empty, the working directory is
`/`, and its environment is only `PATH`, `LANG=C.UTF-8` and the definition's
`env`: the daemon's own environment (API keys among it) is not passed on.
The last `MAX_CAPTURE_BYTES` of stdout and of stderr are kept, decoded as
UTF-8. Exit 0 is success with `exit_code`, `stdout` and `stderr`; any other
exit is an error naming the code and the tail of stderr. At
`timeout_seconds` (or when the step is cancelled) the process group is
killed with SIGKILL and the process reaped; a child that left the group
(its own `setsid`) is out of reach, as under any supervisor without cgroups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, JsonValue

from tools.base import ToolContext, ToolResult, ToolStatus
from tools.declarative.base import DeclaredTool
from tools.declarative.executables import ExecutableNotAllowed, resolve
from tools.declarative.templates import Template, Value, as_text

MAX_CAPTURE_BYTES = 64 * 1024  # of stdout and of stderr, each: the tail is kept
ERROR_TAIL_CHARS = 300  # of stderr, in the error of a failed run
KILL_GRACE_SECONDS = 5.0  # what the executor's own timeout adds to the tool's, so the tool's fires first


class CommandTool(DeclaredTool):
    """A declared command; the class attributes are set per definition (`loader.py`)."""

    def __init__(
        self, *, argv: Sequence[Template], env: Mapping[str, str], allowed: Sequence[str], timeout_seconds: float
    ) -> None:
        self._argv = tuple(argv)
        self._env = dict(env)
        self._allowed = tuple(allowed)
        self._timeout = timeout_seconds

    def __repr__(self) -> str:
        return f"CommandTool({self.name!r}, argv={[t.show() for t in self._argv]})"

    def command(self, params: BaseModel) -> list[str]:
        """The argv for `params`: one element per template element, as the templates say."""
        values: dict[str, Value] = params.model_dump()
        argv = []
        for template in self._argv:
            whole = template.whole
            argv.append(as_text(values[whole.name]) if whole is not None else template.render(values))
        return argv

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        argv = self.command(params)
        if any("\x00" in argument for argument in argv):
            return ToolResult.failure("an argument holds a NUL byte, which no command line can carry")
        try:
            program = await asyncio.to_thread(resolve, argv[0], self._allowed, path=self._path())
        except ExecutableNotAllowed as e:
            return ToolResult.failure(str(e))
        env = {"PATH": self._path(), "LANG": "C.UTF-8", **self._env}
        try:
            process = await asyncio.create_subprocess_exec(
                argv[0], *argv[1:], executable=program, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd="/",
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            return ToolResult.failure(f"cannot start {program}: {e.strerror or e}")
        return await self._wait(process, program)

    async def _wait(self, process: asyncio.subprocess.Process, program: str) -> ToolResult:
        assert process.stdout is not None and process.stderr is not None
        finished = False
        try:
            async with asyncio.timeout(self._timeout):
                stdout, stderr, code = await asyncio.gather(
                    _tail(process.stdout), _tail(process.stderr), process.wait()
                )
            finished = True
        except TimeoutError:
            return ToolResult.failure(
                f"{program} did not finish within {self._timeout:g} s; its process group was killed",
                retryable=self.idempotent,
            )
        finally:
            if not finished:  # timed out, or the step was cancelled: nothing of it may outlive the step
                _kill_group(process)
                with contextlib.suppress(ProcessLookupError):
                    await asyncio.shield(process.wait())
        output: dict[str, JsonValue] = {"exit_code": code, "stdout": stdout, "stderr": stderr}
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            tail = stderr.strip()[-ERROR_TAIL_CHARS:]
            return ToolResult(
                status=ToolStatus.ERROR, error=f"{program} {how}" + (f": {tail}" if tail else " (no stderr)"),
                output=output,
            )
        return ToolResult(status=ToolStatus.SUCCESS, output=output)

    @staticmethod
    def _path() -> str:
        return os.environ.get("PATH") or os.defpath


async def _tail(stream: asyncio.StreamReader) -> str:
    kept = bytearray()
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > MAX_CAPTURE_BYTES:
            del kept[: len(kept) - MAX_CAPTURE_BYTES]
    return kept.decode("utf-8", "replace")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
