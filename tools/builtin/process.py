"""Process tools: `process.start`, `process.stop`, `process.restart` and `process.logs`.

A step names the resource (`name`) and nothing else: how to run it is the
`Launch` the process agent registered for that resource in the shared
`ProcessTable`, after validating its desired value. The plan's desired
revision pins that value, so an approval covers the command too. A model
that writes a step can therefore choose only which of the agent's resources
to act on, never what runs; and the executable is resolved and checked
against `agents.process.allowed_executables` again just before it is run.

`process.start` is idempotent (a running process is left alone) and waits
`start_seconds` (as supervisord's `startsecs`): a process that exits within
them fails the step, with its last log lines. `process.stop` sends the stop
signal to the process group and SIGKILL after `stop_timeout_seconds`;
stopping what is not running succeeds. `process.restart` checks the
executable, stops, then starts. Start and stop can tell read-only whether
they took effect (`verify`), and so can restart: the pidfile names the plan
step that started the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plans import NAME_PATTERN, RiskLevel
from tools.base import Tool, ToolContext, ToolResult
from tools.blocking import run_blocking
from tools.proc import boot_id
from tools.process_table import ExecutableNotAllowed, Launch, ProcessTable, Started

MAX_LOG_LINES = 200
FAILURE_LOG_LINES = 10  # shown when a process exits within its start_seconds


class NameParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=f"^{NAME_PATTERN.pattern}$", description="Name of the process resource.")


class LogsParams(NameParams):
    lines: int = Field(default=50, ge=1, le=MAX_LOG_LINES, description="How many of the last lines to return.")


def _started_by(ctx: ToolContext) -> str:
    return f"{ctx.plan_id}/{ctx.step_index}"


class _ProcessTool(Tool):
    def __init__(self, *, table: ProcessTable) -> None:
        self._table = table

    def _launch(self, name: str) -> Launch | ToolResult:
        launch = self._table.launch(name)
        if launch is None:
            return ToolResult.failure(
                f"process/{name} is not a process resource this daemon knows (no valid desired value seen for it)"
            )
        return launch

    async def _start(self, launch: Launch, ctx: ToolContext) -> ToolResult:
        try:
            started = await run_blocking(
                lambda commit: self._table.start(launch, started_by=_started_by(ctx), commit=commit)
            )
        except ExecutableNotAllowed as e:
            return ToolResult.failure(f"process/{launch.name} may not run: {e}")
        except (OSError, KeyError) as e:  # KeyError: the user is gone
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return ToolResult.failure(f"starting process/{launch.name} failed: {reason}")
        if started.already:
            return ToolResult.success(pid=started.pid, already_running=True)
        return await self._settled(launch, started)

    async def _settled(self, launch: Launch, started: Started) -> ToolResult:
        """Success once the process has run `start_seconds` (watched from now on); failure if it exits sooner."""
        exited = self._table.watch(launch.name, started.pid, started.start_time, boot_id())
        if launch.start_seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), launch.start_seconds)
        if not exited.is_set():
            return ToolResult.success(pid=started.pid, already_running=False)
        record = self._table.exit_of(started.pid, started.start_time)
        how = record.describe() if record is not None else "exited"
        lines = await asyncio.to_thread(self._table.last_lines, launch.name, FAILURE_LOG_LINES)
        shown = " | ".join(lines[-3:])[:400] or "(no output)"
        return ToolResult.failure(
            f"process/{launch.name} {how} within {launch.start_seconds:g} s of starting (start_seconds); "
            f"last log lines: {shown}",
            pid=started.pid, log=list[JsonValue](lines),
        )  # fmt: skip


class ProcessStart(_ProcessTool):
    name: ClassVar[str] = "process.start"
    description: ClassVar[str] = (
        "Start a process resource's process as its desired value says. Starting one that runs already succeeds."
    )
    parameters: ClassVar[type[BaseModel]] = NameParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 90.0  # start_seconds is at most 60

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, NameParams)
        launch = self._launch(params.name)
        if isinstance(launch, ToolResult):
            return launch
        return await self._start(launch, ctx)

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, NameParams)
        launch = self._table.launch(params.name)
        if launch is None:
            return None
        pf, running = await asyncio.to_thread(self._table.current, params.name)
        return running and pf is not None and pf.command_hash == launch.command_hash


class ProcessStop(_ProcessTool):
    name: ClassVar[str] = "process.stop"
    description: ClassVar[str] = (
        "Stop a process resource's process: its stop signal to the process group, SIGKILL after its stop timeout. "
        "Stopping one that is not running succeeds."
    )
    parameters: ClassVar[type[BaseModel]] = NameParams
    risk: ClassVar[RiskLevel] = RiskLevel.MEDIUM
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 90.0  # stop_timeout_seconds is at most 60, then SIGKILL and 5 s

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, NameParams)
        try:
            pf = await run_blocking(lambda commit: self._table.stop(params.name, commit=commit))
        except OSError as e:
            return ToolResult.failure(f"stopping process/{params.name} failed: {e.strerror or e}")
        return ToolResult.success(stopped_pid=pf.pid if pf is not None else None)

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, NameParams)
        pf, _ = await asyncio.to_thread(self._table.current, params.name)
        return pf is None


class ProcessRestart(_ProcessTool):
    name: ClassVar[str] = "process.restart"
    description: ClassVar[str] = "Stop a process resource's process (if it runs) and start it again."
    parameters: ClassVar[type[BaseModel]] = NameParams
    risk: ClassVar[RiskLevel] = RiskLevel.MEDIUM
    idempotent: ClassVar[bool] = False  # a second run restarts it again
    timeout_s: ClassVar[float] = 180.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, NameParams)
        launch = self._launch(params.name)
        if isinstance(launch, ToolResult):
            return launch
        try:  # before anything is stopped: a process that could not be started again is left running
            await asyncio.to_thread(self._table.check, launch)
        except ExecutableNotAllowed as e:
            return ToolResult.failure(f"process/{launch.name} may not run: {e}")
        try:
            await run_blocking(lambda commit: self._table.stop(params.name, commit=commit))
        except OSError as e:
            return ToolResult.failure(f"stopping process/{params.name} failed: {e.strerror or e}")
        return await self._start(launch, ctx)

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, NameParams)
        pf, running = await asyncio.to_thread(self._table.current, params.name)
        return running and pf is not None and pf.started_by == _started_by(ctx)


class ProcessLogs(_ProcessTool):
    name: ClassVar[str] = "process.logs"
    description: ClassVar[str] = "The last lines a process resource's process wrote (stdout and stderr)."
    parameters: ClassVar[type[BaseModel]] = LogsParams
    risk: ClassVar[RiskLevel] = RiskLevel.READ_ONLY
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 30.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, LogsParams)
        lines = await asyncio.to_thread(self._table.last_lines, params.name, params.lines)
        log = str(self._table.log_path(params.name))
        if not lines:
            return ToolResult.no_data(log=log, lines=[])
        return ToolResult.success(log=log, lines=list[JsonValue](lines))


def process_tools(*, table: ProcessTable) -> list[Tool]:
    return [ProcessStart(table=table), ProcessStop(table=table), ProcessRestart(table=table), ProcessLogs(table=table)]
