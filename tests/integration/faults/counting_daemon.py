"""A real setpoint daemon whose only agent runs a 3-step plan with a non-idempotent middle step.

Run as `python counting_daemon.py CONFIG`. Kind `job`, spec `{"dir": ..., "verifiable": bool}`.
The plan has one step per missing marker file in `dir`: `job.prepare`
(idempotent), `job.launch` (NOT idempotent; `job.launch_verifiable` can
verify itself by its marker) and `job.finish` (idempotent). Every call
appends the tool's name to `dir/calls.log`, so the test can count them.

Crash injection: if `dir/kill_at` holds `<step>:<before|after>`, that tool
removes the file and SIGKILLs its own process just before or just after its
side effect, putting the crash exactly on a step boundary.

Pause injection: if `dir/pause_at` holds `<step>:<before|after>`, that tool
writes its pid to `dir/paused` and waits there, inside the step, until the
file is removed (a test freezes the process meanwhile). Every call is also
appended to `dir/calls_by.log` as `<step> <pid>`, so a test with several
daemons can tell which one ran what.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from agents import AgentRegistry
from plans import ExecutionPlan, Issue, RiskLevel, Snapshot, Step
from policies import Policies, load_policies
from reconciler.assembly import Assembly
from reconciler.daemon import Daemon
from reconciler.logs import configure_logging
from reconciler.settings import load_settings
from tools import Tool, ToolContext, ToolRegistry, ToolResult


class DirParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str


def _maybe_die(directory: Path, step: str, when: str) -> None:
    kill_at = directory / "kill_at"
    try:
        wanted = kill_at.read_text().strip()
    except FileNotFoundError:
        return
    if wanted == f"{step}:{when}":
        kill_at.unlink()
        os.kill(os.getpid(), signal.SIGKILL)


async def _maybe_pause(directory: Path, step: str, when: str) -> None:
    pause_at = directory / "pause_at"
    try:
        wanted = pause_at.read_text().strip()
    except FileNotFoundError:
        return
    if wanted != f"{step}:{when}":
        return
    (directory / "paused").write_text(str(os.getpid()))
    while pause_at.exists():  # noqa: ASYNC110 - the test removes a file: there is no event to wait on
        await asyncio.sleep(0.02)


class MarkerTool(Tool):
    step: ClassVar[str]
    parameters: ClassVar[type[BaseModel]] = DirParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    timeout_s: ClassVar[float] = 10.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, DirParams)
        directory = Path(params.dir)
        _maybe_die(directory, self.step, "before")
        await _maybe_pause(directory, self.step, "before")
        # Synchronous on purpose: the call must be on disk before the crash point after it.
        for name, line in (("calls.log", self.step), ("calls_by.log", f"{self.step} {os.getpid()}")):
            with open(directory / name, "a") as log:  # noqa: ASYNC230
                log.write(f"{line}\n")
                log.flush()
                os.fsync(log.fileno())
        (directory / self.step).touch()
        _maybe_die(directory, self.step, "after")
        await _maybe_pause(directory, self.step, "after")
        return ToolResult.success()


class Prepare(MarkerTool):
    name: ClassVar[str] = "job.prepare"
    description: ClassVar[str] = "prepare (idempotent)"
    step: ClassVar[str] = "prepare"
    idempotent: ClassVar[bool] = True


class Launch(MarkerTool):
    name: ClassVar[str] = "job.launch"
    description: ClassVar[str] = "launch (not idempotent, cannot verify)"
    step: ClassVar[str] = "launch"
    idempotent: ClassVar[bool] = False


class LaunchVerifiable(Launch):
    name: ClassVar[str] = "job.launch_verifiable"
    description: ClassVar[str] = "launch (not idempotent, verifies by its marker)"

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        assert isinstance(params, DirParams)
        return (Path(params.dir) / "launch").exists()


class Finish(MarkerTool):
    name: ClassVar[str] = "job.finish"
    description: ClassVar[str] = "finish (idempotent)"
    step: ClassVar[str] = "finish"
    idempotent: ClassVar[bool] = True


class JobAgent:
    name = "job"
    kinds = frozenset({"job"})

    def __init__(self) -> None:
        self._tools: list[Tool] = [Prepare(), Launch(), LaunchVerifiable(), Finish()]

    def tools(self) -> Sequence[Tool]:
        return self._tools

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        directory = Path(str(snapshot.desired.spec["dir"]))
        launch = "job.launch_verifiable" if snapshot.desired.spec.get("verifiable") else "job.launch"
        steps = tuple(
            Step(tool=tool, parameters={"dir": str(directory)}, description=marker, risk=RiskLevel.LOW)
            for marker, tool in (("prepare", "job.prepare"), ("launch", launch), ("finish", "job.finish"))
            if not (directory / marker).exists()
        )
        return snapshot.plan(agent=self.name, steps=steps)

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)


def job_assembly(policies: Policies) -> Assembly:
    """The daemon's parts with the job agent as the only agent."""
    agents = AgentRegistry([JobAgent()])
    return Assembly(agents=agents, tools=ToolRegistry(agents.tools()), policies=policies, poll_seconds={})


def main() -> int:
    settings = load_settings(sys.argv[1])
    configure_logging(settings.log.level)
    assembly = job_assembly(load_policies(settings.policies.file))

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await Daemon(settings, assembly=assembly).run(stop)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
