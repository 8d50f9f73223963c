"""The built-in `process` agent: keeps one process running per resource.

Desired spec: `command` (argv, never through a shell), `env`, `cwd`
(default `/`), `user` (only when the daemon runs as root), `stop_signal`,
`stop_timeout_seconds`, `start_seconds` (as supervisord's `startsecs`),
`restart` backoff, `crash_loop` limit and `log` rotation. The executable is
resolved (PATH, then `realpath`) and must be allowed by
`agents.process.allowed_executables`; anything else is an invalid resource.

Observed state (`tools/process_table.py`): `running`, `pid`, `started_at`,
`exit` (of the last run, when known), `restarts_in_window` and the
`command_hash` of what runs, which stays the same between polls while
nothing changes. The agent watches every process it runs or adopts (a pidfd
on the event loop) and tells its subscriber (`subscribe`, wired to the work
queue) the moment one exits, so a crash is planned for at once rather than
at the next poll.

Rules:
- not running: `process.start` (low), after the restart backoff: the n-th
  restart after a crash waits `min(cap, base * 2^(n-1))` from the last start;
  until then planning is unavailable (`Pending`, with when it restarts);
- running something else (the hash of argv, env, cwd and user differs):
  `process.restart` (medium);
- running as desired: no plan;
- deleted: `process.stop` (medium) when it runs;
- a crash loop (as many restarts within `crash_loop.window_seconds` as
  `crash_loop.max_restarts`, and it died again): `GaveUp`: the resource is
  `Failed` with the last log lines, and the issue `crash-loop` is reported
  on it. It stays so while that issue is open and the command unchanged;
  once an operator resolves the issue (`setpoint issues resolve`), or the
  command, env, cwd or user changes, the restart history starts afresh and it is started.
- an issue from a failing HTTP check (`source: http_check/...`):
  `process.restart` (medium). Any other issue goes to the model planner
  (`fallback`) when there is one, limited to steps on this resource's own
  process, never stopping it (`in_scope`); else no rule covers it.

The agent's history files record that a crash-loop issue has been seen, so
that its disappearance means it was resolved; `setpoint plan`, which calls
`reconcile` too, may record the same (it only says what etcd says).
Everything that touches files or looks up users runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from agents.llm import ModelPlanner
from plans import (
    ExecutionPlan,
    GaveUp,
    InvalidResourceError,
    Issue,
    PlanningUnavailable,
    Resource,
    ResourceKey,
    Snapshot,
    Step,
)
from plans.errors import describe_validation_error
from tools import Tool
from tools.builtin.process import ProcessLogs, ProcessRestart, ProcessStart, ProcessStop, process_tools
from tools.process_table import (
    ExecutableNotAllowed,
    GaveUpRecord,
    History,
    Launch,
    ProcessTable,
    resolve_executable,
    user_exists,
)

log = structlog.get_logger("setpoint.agents.process")

NO_RULE = "no rule covers this issue"
CRASH_LOOP_ISSUE = "crash-loop"
HEALTH_SOURCE = "http_check/"
GAVE_UP_LOG_LINES = 5


# Environment variables that choose what code a program loads or runs (the program found on PATH, a preloaded
# library, a startup script, an interpreter's module path): setting them would run what the allowlist refuses.
_CODE_ENV = frozenset({
    "PATH", "BASH_ENV", "ENV", "IFS", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "GCONV_PATH", "HOSTALIASES",
    "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH",
    "RUBYOPT", "RUBYLIB", "PERLLIB", "GIT_EXEC_PATH", "GIT_SSH", "GIT_SSH_COMMAND", "EDITOR", "VISUAL", "PAGER",
})  # fmt: skip
_CODE_ENV_PREFIXES = ("LD_", "PYTHON", "PERL5", "DYLD_", "MALLOC_", "GLIBC_")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RestartSpec(_Spec):
    base_seconds: float = Field(default=1.0, gt=0, le=3600, description="First restart delay. Defaults to 1 s.")
    cap_seconds: float = Field(default=60.0, gt=0, le=86400, description="Longest restart delay. Defaults to 60 s.")

    @model_validator(mode="after")
    def _order(self) -> RestartSpec:
        if self.cap_seconds < self.base_seconds:
            raise ValueError("cap_seconds must not be smaller than base_seconds")
        return self

    def backoff(self, restarts: int) -> float:
        """How long after the last start the next restart waits, after `restarts` restarts: none at first."""
        return 0.0 if restarts <= 0 else min(self.cap_seconds, self.base_seconds * 2 ** min(restarts - 1, 62))


class CrashLoopSpec(_Spec):
    max_restarts: int = Field(
        default=5, ge=1, le=1000,
        description="Restarts after crashes within the window before giving up. Defaults to 5: with the first "
        "start, 6 plans, which the default flap guard (6 per 600 s) still lets run.",
    )  # fmt: skip
    window_seconds: float = Field(default=300.0, gt=0, le=86400, description="Defaults to 300 s.")


class LogSpec(_Spec):
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096, description="Rotate past this size. Defaults to 10 MiB.")
    backups: int = Field(default=3, ge=0, le=20, description="Rotated copies kept. Defaults to 3.")


class ProcessSpec(_Spec):
    command: list[str] = Field(min_length=1, description="argv; the first is an absolute path or a name on PATH.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment, besides the daemon's PATH; names that change which code runs (PATH, LD_*, "
        "PYTHON*, BASH_ENV, ...) are refused.",
    )
    cwd: str = Field(default="/", description="Working directory. Defaults to /.")
    user: str | None = Field(default=None, description="Run as this user (the daemon must run as root).")
    stop_signal: str = Field(default="TERM", description="Signal that asks it to stop. Defaults to TERM.")
    stop_timeout_seconds: float = Field(default=10.0, gt=0, le=60, description="Then SIGKILL. Defaults to 10 s.")
    start_seconds: float = Field(
        default=1.0, ge=0, le=60, description="It must run this long for a start to count. Defaults to 1 s."
    )
    restart: RestartSpec = Field(default_factory=RestartSpec)
    crash_loop: CrashLoopSpec = Field(default_factory=CrashLoopSpec)
    log: LogSpec = Field(default_factory=LogSpec)

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the first element (the program) must not be empty")
        if any("\x00" in part for part in value):
            raise ValueError("an argument contains a NUL byte")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not name or "=" in name or "\x00" in name or "\x00" in text:
                raise ValueError(f"{name[:40]!r} is not a valid environment variable (name without '=', no NUL)")
            if name in _CODE_ENV or name.startswith(_CODE_ENV_PREFIXES):
                raise ValueError(
                    f"{name[:40]} may not be set: it changes which code runs, which would get round "
                    "agents.process.allowed_executables"
                )
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str) -> str:
        if not os.path.isabs(value) or "\x00" in value:
            raise ValueError("must be an absolute path")
        return value

    @field_validator("stop_signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in signal.Signals.__members__ and f"SIG{name}" not in signal.Signals.__members__:
            raise ValueError(f"{value!r} is not a signal name such as TERM, INT or HUP")
        return name

    @property
    def signum(self) -> int:
        return int(signal.Signals[f"SIG{self.stop_signal}"])


def _spec_error(error: ValidationError) -> str:
    return describe_validation_error(
        error, what=None, prefix="spec.",
        unknown="is not a known field (expected command, env, cwd, user, stop_signal, stop_timeout_seconds, "
        "start_seconds, restart, crash_loop, log)",
    )  # fmt: skip


def _launch(name: str, spec: ProcessSpec) -> Launch:
    return Launch(
        name=name, argv=tuple(spec.command), env=dict(spec.env), cwd=spec.cwd, user=spec.user,
        stop_signal=spec.signum, stop_timeout_seconds=spec.stop_timeout_seconds, start_seconds=spec.start_seconds,
        log_max_bytes=spec.log.max_bytes, log_backups=spec.log.backups, window_seconds=spec.crash_loop.window_seconds,
    )  # fmt: skip


def _exit_text(state: dict[str, JsonValue]) -> str:
    found = state.get("exit")
    if isinstance(found, dict):
        if found.get("signal"):
            return f"was killed by {found['signal']}"
        if found.get("code") is not None:
            return f"exited (code {found['code']})"
    return "exited"


class ProcessAgent:
    name = "process"
    kinds = frozenset({"process"})

    def __init__(
        self,
        *,
        allowed_executables: Sequence[str],
        state_dir: str | Path,
        log_dir: str | Path,
        fallback: ModelPlanner | None = None,
        running_as_root: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`running_as_root` defaults to whether the daemon's effective uid is 0; `clock` is wall-clock time."""
        self.table = ProcessTable(
            state_dir=Path(state_dir), log_dir=Path(log_dir), allowed_executables=allowed_executables
        )
        self._tools = process_tools(table=self.table)
        self._fallback = fallback
        self._root = os.geteuid() == 0 if running_as_root is None else running_as_root
        self._now = clock
        self._observed: dict[str, tuple[Resource, Launch]] = {}

    def tools(self) -> Sequence[Tool]:
        return self._tools

    def subscribe(self, notify: Callable[[ResourceKey], None]) -> None:
        self.table.subscribe(lambda name: notify(ResourceKey(kind="process", name=name)))

    def close(self) -> None:
        """Stop watching processes (they go on running)."""
        self.table.close()

    # -- validating ----------------------------------------------------------------------------------------

    @staticmethod
    def spec(desired: Resource) -> ProcessSpec:
        try:
            return ProcessSpec.model_validate(desired.spec)
        except ValidationError as e:
            raise InvalidResourceError(_spec_error(e)) from None

    def parse(self, desired: Resource) -> tuple[ProcessSpec, Launch]:
        """The spec and its launch, registered for the tools; InvalidResourceError when it may not run.
        Blocks (PATH lookup, realpath, user database): call it in a thread."""
        spec = self.spec(desired)
        if spec.user is not None:
            if not self._root:
                raise InvalidResourceError(
                    f"spec.user: the daemon runs as uid {os.geteuid()}, not root, so it cannot run a process as "
                    f"{spec.user!r}; remove spec.user or run setpoint as root"
                )
            if not user_exists(spec.user):
                raise InvalidResourceError(f"spec.user: there is no user {spec.user!r} on this host")
        try:
            resolve_executable(spec.command[0], path=None, patterns=self.table.allowed_executables)
        except ExecutableNotAllowed as e:
            raise InvalidResourceError(f"spec.command[0]: {e}") from None
        launch = _launch(desired.name, spec)
        self.table.register(launch)
        return spec, launch

    def validate(self, desired: Resource) -> None:
        self.parse(desired)

    # -- observing ------------------------------------------------------------------------------------------

    async def observe(self, desired: Resource) -> dict[str, JsonValue]:
        """What runs for `desired` now; a running process not yet watched (one a previous daemon started) is
        adopted: watched from now on."""
        launch = self._observed_launch(desired)
        cached = self.table.observe_cached(launch)  # a watched process that has not exited: no file to read
        if cached is not None:
            if self.table.logs_due():
                await asyncio.to_thread(self.table.rotate_logs)
            return cached.state(launch, self._now())
        seen = await asyncio.to_thread(self.table.observe, launch)
        pf = seen.pidfile
        if seen.running and pf is not None and not self.table.watching(desired.name):
            self.table.watch(desired.name, pf.pid, pf.start_time, pf.boot_id)
        return seen.state(launch, self._now())

    def _observed_launch(self, desired: Resource) -> Launch:
        """The launch `desired` describes, validated once per value (polls repeat it); no allowlist here: what
        runs is seen, whatever it is."""
        known = self._observed.get(desired.name)
        if known is not None and known[0] == desired:
            return known[1]
        launch = _launch(desired.name, self.spec(desired))
        self._observed[desired.name] = (desired, launch)
        return launch

    # -- planning -------------------------------------------------------------------------------------------

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        spec, launch = await asyncio.to_thread(self.parse, snapshot.desired)
        state = snapshot.actual.state if snapshot.actual is not None else {}
        name = snapshot.desired.name
        if state.get("running") is True:
            if state.get("command_hash") != launch.command_hash:
                return self._step(
                    snapshot, ProcessRestart, f"restart process/{name}: its command, env, cwd or user changed",
                    reasoning=f"runs {state.get('command_hash')}, want {launch.command_hash}",
                )  # fmt: skip
            return snapshot.plan(agent=self.name, reasoning=f"process runs as desired (pid {state.get('pid')})")
        history = await asyncio.to_thread(self.table.history, launch)
        fresh = await self._crash_loop(snapshot, spec, launch, state, history)
        if not fresh:
            self._backoff(snapshot, spec, state, history)
        why = "not started yet" if not state.get("started_at") else _exit_text(state)
        if fresh:
            why = "its crash-loop issue was resolved: starting again with a fresh restart history"
        return self._step(snapshot, ProcessStart, f"start process/{name} ({' '.join(spec.command)[:200]})",
                          reasoning=f"process is not running: {why}")  # fmt: skip

    async def _crash_loop(
        self, snapshot: Snapshot, spec: ProcessSpec, launch: Launch, state: dict[str, JsonValue], history: History
    ) -> bool:
        """Raise GaveUp while the process is in a crash loop; True when the loop's issue was just resolved."""
        name = snapshot.desired.name
        restarts = history.restarts_within(spec.crash_loop.window_seconds, self._now())
        issue_open = any(issue.source == f"process/{name}" for issue in snapshot.issues)
        gave = history.gave_up
        if gave is None:
            if restarts < spec.crash_loop.max_restarts:
                return False
            await self._record(launch, lambda h: h.model_copy(update={"gave_up": GaveUpRecord(at=self._now())}))
            log.warning("process.crash_loop", name=name, restarts=restarts)
        elif issue_open and not gave.issue_seen:
            seen = gave.model_copy(update={"issue_seen": True})
            await self._record(launch, lambda h: h.model_copy(update={"gave_up": seen}))
        elif not issue_open and gave.issue_seen:  # an operator resolved it
            await self._record(launch, lambda h: History(command_hash=h.command_hash, last_exit=h.last_exit))
            return True
        raise await self._gave_up(snapshot, spec, state, restarts)

    async def _record(self, launch: Launch, change: Callable[[History], History]) -> None:
        try:
            await asyncio.to_thread(self.table.update_history, launch, change)
        except OSError as e:  # `setpoint plan` run by someone who cannot write there: the decision stands
            log.warning("process.history_unwritable", name=launch.name, error=str(e)[:200])

    async def _gave_up(
        self, snapshot: Snapshot, spec: ProcessSpec, state: dict[str, JsonValue], restarts: int
    ) -> GaveUp:
        name = snapshot.desired.name
        lines = await asyncio.to_thread(self.table.last_lines, name, GAVE_UP_LOG_LINES)
        shown = " | ".join(line[:160] for line in lines)[:500] or "(no output)"
        window = spec.crash_loop.window_seconds
        message = (
            f"process/{name} {_exit_text(state)} after {restarts} restarts within {window:g} s "
            f"(crash_loop.max_restarts {spec.crash_loop.max_restarts}); not restarting it until the issue "
            f"{CRASH_LOOP_ISSUE} is resolved or the command, env, cwd or user changes; last log lines: {shown}"
        )
        issue = Issue(
            summary=f"process/{name} keeps crashing: {restarts} restarts within {window:g} s; restarting stopped",
            severity="warning", source=f"process/{name}",
            details={"log": lines, "exit": state.get("exit"), "restarts": restarts, "window_seconds": window,
                     "log_file": str(self.table.log_path(name))},
        )  # fmt: skip
        return GaveUp(message, issue=issue, issue_id=CRASH_LOOP_ISSUE)

    def _backoff(self, snapshot: Snapshot, spec: ProcessSpec, state: dict[str, JsonValue], history: History) -> None:
        """PlanningUnavailable until the restart backoff since the last start has passed."""
        restarts = history.restarts_within(spec.crash_loop.window_seconds, self._now())
        if restarts == 0:
            return  # the first restart after a crash is at once
        wait = history.restarts[-1] + spec.restart.backoff(restarts) - self._now()  # from the last (re)start
        if wait > 0:
            raise PlanningUnavailable(
                f"process/{snapshot.desired.name} {_exit_text(state)}; restarting in {wait:.0f} s "
                f"(restart backoff after {restarts} restart{'s' if restarts != 1 else ''})",
                delay=wait,
            )

    def _step(self, snapshot: Snapshot, tool: type[Tool], description: str, *, reasoning: str) -> ExecutionPlan:
        step = Step(tool=tool.name, parameters={"name": snapshot.desired.name}, description=description,
                    risk=tool.risk)  # fmt: skip
        return snapshot.plan(agent=self.name, steps=(step,), reasoning=reasoning)

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        """Stop the process of a deleted resource; the stop needs only its name (its pidfile says how)."""
        self._observed.pop(snapshot.desired.name, None)
        state = snapshot.actual.state if snapshot.actual is not None else {}
        if state and state.get("running") is not True:
            return snapshot.plan(agent=self.name, reasoning="process is not running")
        return self._step(
            snapshot, ProcessStop, f"stop process/{snapshot.desired.name}: its desired resource was deleted",
            reasoning="desired resource deleted",
        )  # fmt: skip

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)

    async def diff(self, snapshot: Snapshot) -> str:
        """What would change, in words: start, restart (and why) or stop."""
        state = snapshot.actual.state if snapshot.actual is not None else {}
        if snapshot.deleted:
            return f"stop pid {state.get('pid')}" if state.get("running") else ""
        spec, launch = await asyncio.to_thread(self.parse, snapshot.desired)
        if not state.get("running"):
            return f"start {' '.join(spec.command)}"
        if state.get("command_hash") != launch.command_hash:
            return f"restart pid {state.get('pid')} as {' '.join(spec.command)} (command, env, cwd or user changed)"
        return ""

    # -- healing --------------------------------------------------------------------------------------------

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        """A failing HTTP check restarts the process; other issues go to the model, if there is one. Asked only
        when the process runs as desired (otherwise reconcile's plan answers the issue)."""
        await asyncio.to_thread(self.parse, snapshot.desired)  # registers the launch a restart needs
        name = snapshot.desired.name
        if issue.source.startswith(HEALTH_SOURCE):
            return self._step(
                snapshot, ProcessRestart, f"restart process/{name}: {issue.source} reports it unhealthy",
                reasoning=f"{issue.summary[:200]}: restart the process",
            )  # fmt: skip
        if issue.source == f"process/{name}":
            return snapshot.plan(
                agent=self.name,
                reasoning=f"the crash loop is over (the process runs again); resolve the {CRASH_LOOP_ISSUE} issue",
            )
        if self._fallback is None:
            return snapshot.plan(agent=self.name, reasoning=f"{NO_RULE}: the process runs as desired")
        offered = [tool for tool in self._tools if tool.name != ProcessStop.name]  # stopping it cannot heal it
        return await self._fallback.heal(
            issue, snapshot, agent=self.name, tools=offered, rules_said=f"{NO_RULE}: the process runs as desired",
            scope=lambda step: self.in_scope(step, name=name), drift=[],
        )  # fmt: skip

    @staticmethod
    def in_scope(step: Step, *, name: str) -> str | None:
        """Why a model's `step` for process/`name` is outside what it may touch, or None."""
        if step.parameters.get("name") != name:
            return f"this resource is process/{name}; a step for it may not act on another process"
        if step.tool == ProcessStop.name:
            return "stopping the process this resource keeps running cannot heal it"
        if step.tool not in (ProcessStart.name, ProcessRestart.name, ProcessLogs.name):
            return f"{step.tool} is not a process tool"
        return None

