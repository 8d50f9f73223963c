"""The supervised processes of the `process` agent: how each is launched, its pidfile, its restart history,
and a watch on its exit.

One `ProcessTable` is shared by the agent (which registers a `Launch` for
each valid desired resource, after checking its executable against the
allowlist) and the process tools (which look the launch up by name, so a
plan's steps carry only a resource name, and check the executable again
before they run it: no step, whoever wrote it, runs anything the allowlist
refuses).

Files, per resource, under the state directory:

- `<name>.pid` (JSON): pid, start time and boot id (`tools/proc.py`: a
  reused pid is never taken for ours), the hash of what was launched, how to
  stop it, and which plan step started it. Written when a process starts,
  removed when it is stopped on purpose: a pidfile whose process is gone
  means the process exited on its own.
- `<name>.history.json` (JSON): the restarts after a crash (their times),
  the last exit, and whether the agent gave up on a crash loop; kept for one
  launch hash: a changed command starts a new history.

Processes run in a session of their own, with their output appended to
`<log_dir>/<name>.log` and no pipe to the daemon, so they outlive it; the
next daemon finds them by their pidfiles and adopts them. Only the daemon's
PATH is passed on to them, with the resource's own `env` (the daemon's
environment may hold model API keys).

A poll of a process that is watched and has not exited reads no file: its
state is the last one read (`observe_cached`), and the logs of all such
processes are checked together, in one thread, every ROTATE_CHECK_SECONDS;
so a log may outgrow its size by what the process writes in that time. This keeps supervising many processes
almost free at idle.

Exits are seen at once: `watch` opens a pidfd for a running process (ours or
adopted) and asks the event loop to call back when it becomes readable,
which happens when the process exits. The callback reaps it when it is our
child (keeping its exit status), and tells the subscriber which resource
changed. Setting up a watch reads `/proc` on the event loop (memory, never
a disk). Everything else here blocks and runs in a thread; files are
guarded by one lock, which the event loop never takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from tools.blocking import Commit
from tools.proc import boot_id, identity, is_running, rotate, tail

MAX_REMEMBERED_EXITS = 1000
ROTATE_CHECK_SECONDS = 30.0  # how often the log of a watched process (observed without reading files) is checked
REAP_GRACE_SECONDS = 5.0  # after SIGKILL, how long a stop waits for the process to be gone
_GLOB = frozenset("*?[")


class ExecutableNotAllowed(ValueError):
    """The command's executable cannot be found, or the allowlist refuses it; the message says which."""


def _matches(path: str, pattern: str) -> bool:
    """Glob match where `*` and `?` never cross a `/`."""
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def allowed(real: str, patterns: Sequence[str]) -> bool:
    """Whether the resolved executable `real` is one `patterns` (absolute paths or globs) allow. Each pattern is
    resolved as far as it exists, so `/bin/*` allows what lies in `/usr/bin` when `/bin` links there."""
    for pattern in patterns:
        for form in {pattern, os.path.realpath(pattern)}:
            if (_GLOB.isdisjoint(form) and real == form) or (not _GLOB.isdisjoint(form) and _matches(real, form)):
                return True
    return False


def resolve_executable(program: str, *, path: str | None, patterns: Sequence[str]) -> str:
    """The real path of `program` (a bare name is looked up on `path`, else on the daemon's PATH), if the
    allowlist `patterns` allows it; else ExecutableNotAllowed saying why."""
    setting = "agents.process.allowed_executables"
    if "\x00" in program:
        raise ExecutableNotAllowed(f"{program!r} contains a NUL byte")
    if "/" in program:
        if not os.path.isabs(program):
            raise ExecutableNotAllowed(f"{program!r} must be an absolute path or a bare name looked up on PATH")
        found: str | None = program
    else:
        found = shutil.which(program, path=path if path is not None else os.environ.get("PATH", os.defpath))
        if found is None:
            raise ExecutableNotAllowed(f"{program!r} was not found on PATH")
    assert found is not None
    real = os.path.realpath(found)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        raise ExecutableNotAllowed(f"{program!r} ({real}) is not an executable file")
    if not patterns:
        raise ExecutableNotAllowed(f"{program!r} resolves to {real}, and {setting} is empty: every command is refused")
    if not allowed(real, patterns):
        shown = ", ".join(patterns[:5]) + (", ..." if len(patterns) > 5 else "")
        raise ExecutableNotAllowed(f"{program!r} resolves to {real}, which {setting} ({shown}) does not allow")
    return real


@dataclass(frozen=True, slots=True)
class Launch:
    """How to run one resource's process: what the agent validated, ready for the tools."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    user: str | None
    stop_signal: int
    stop_timeout_seconds: float
    start_seconds: float
    log_max_bytes: int
    log_backups: int
    window_seconds: float
    command_hash: str = field(init=False)

    def __post_init__(self) -> None:
        what = {"argv": list(self.argv), "env": dict(sorted(self.env.items())), "cwd": self.cwd, "user": self.user}
        canonical = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        object.__setattr__(self, "command_hash", hashlib.sha256(canonical.encode()).hexdigest()[:16])


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pidfile(_File):
    pid: int
    start_time: int = Field(description="/proc/<pid>/stat field 22: clock ticks after boot.")
    boot_id: str
    command_hash: str
    started_at: float = Field(description="Wall-clock time of the start (seconds since the epoch).")
    started_by: str = Field(default="", description="<plan id>/<step index> of the step that started it.")
    stop_signal: int
    stop_timeout_seconds: float


class ExitRecord(_File):
    pid: int
    start_time: int
    code: int | None = None
    signal: str | None = None
    at: float

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (status unknown: not a child of this daemon)"

    def state(self) -> dict[str, JsonValue]:
        return {"code": self.code, "signal": self.signal}


class GaveUpRecord(_File):
    at: float
    issue_seen: bool = False


class History(_File):
    command_hash: str
    restarts: list[float] = Field(default_factory=list, description="When the process was started after a crash.")
    last_exit: ExitRecord | None = None
    gave_up: GaveUpRecord | None = None

    def restarts_within(self, window: float, now: float) -> int:
        return sum(1 for t in self.restarts if t > now - window)


@dataclass(frozen=True, slots=True)
class Observation:
    running: bool
    pidfile: Pidfile | None
    history: History

    def state(self, launch: Launch, now: float) -> dict[str, JsonValue]:
        """The observed state written under actual/: stable between polls while nothing changes."""
        pf = self.pidfile
        last = self.history.last_exit
        return {
            "running": self.running,
            "pid": pf.pid if pf is not None and self.running else None,
            "started_at": _iso(pf.started_at) if pf is not None else None,
            "exit": last.state() if last is not None else None,
            "restarts_in_window": self.history.restarts_within(launch.window_seconds, now),
            "command_hash": pf.command_hash if pf is not None else None,
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True, slots=True)
class Started:
    pid: int
    start_time: int
    already: bool  # it was running already: nothing was started


@dataclass(slots=True)
class _Watch:
    pid: int
    start_time: int
    fd: int
    exited: asyncio.Event


def _exit_record(pid: int, start_time: int, code: int | None) -> ExitRecord:
    """`code` as Popen gives it (negative: killed by that signal), None when unknown."""
    if code is None:
        return ExitRecord(pid=pid, start_time=start_time, at=time.time())
    if code < 0:
        return ExitRecord(pid=pid, start_time=start_time, signal=signal.Signals(-code).name, at=time.time())
    return ExitRecord(pid=pid, start_time=start_time, code=code, at=time.time())


class ProcessTable:
    def __init__(self, *, state_dir: Path, log_dir: Path, allowed_executables: Sequence[str]) -> None:
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.allowed_executables = tuple(allowed_executables)
        self.log_check_seconds = ROTATE_CHECK_SECONDS
        self._launches: dict[str, Launch] = {}
        self._lock = threading.Lock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._watches: dict[str, _Watch] = {}
        self._exits: dict[tuple[int, int], ExitRecord] = {}  # seen by a watch or a stop, until settled
        self._exits_lock = threading.Lock()  # held for a dict operation only: the event loop may take it
        self._seen: dict[str, tuple[Observation, Launch]] = {}  # a running process's last full look
        self._logs_checked = 0.0  # when the logs of watched processes were last checked (monotonic)
        self._notify: Callable[[str], None] = lambda name: None

    # -- the registry --------------------------------------------------------------------------------------

    def register(self, launch: Launch) -> None:
        self._launches[launch.name] = launch

    def launch(self, name: str) -> Launch | None:
        return self._launches.get(name)

    def check(self, launch: Launch) -> None:
        """ExecutableNotAllowed unless the launch's executable, resolved again now, is still allowed."""
        resolve_executable(launch.argv[0], path=None, patterns=self.allowed_executables)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def last_lines(self, name: str, lines: int) -> list[str]:
        return tail(self.log_path(name), lines)

    # -- files (call in a thread) ----------------------------------------------------------------------------

    def _pidfile_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _history_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.history.json"

    def _read_pidfile(self, name: str) -> Pidfile | None:
        try:
            return Pidfile.model_validate_json(self._pidfile_path(name).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError):
            return None  # unreadable: it names no process of ours

    def _read_history(self, name: str, command_hash: str) -> History:
        try:
            history = History.model_validate_json(self._history_path(name).read_bytes())
        except (OSError, ValidationError, ValueError):
            return History(command_hash=command_hash)
        return history if history.command_hash == command_hash else History(command_hash=command_hash)

    def _write(self, path: Path, model: BaseModel) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(model.model_dump_json())
        os.replace(tmp, path)

    def _settle(self, name: str, pf: Pidfile | None, history: History) -> tuple[bool, History]:
        """Whether `pf` runs; when it has exited, its exit goes into `history` (written when new)."""
        running = pf is not None and is_running(pf.pid, pf.start_time, pf.boot_id)
        if pf is not None and not running:
            last = history.last_exit
            if last is None or (last.pid, last.start_time) != (pf.pid, pf.start_time):
                record = self._take_exit(pf.pid, pf.start_time) or self._reap(pf.pid, pf.start_time)
                history = history.model_copy(update={"last_exit": record})
                self._write(self._history_path(name), history)
        return running, history

    def observe(self, launch: Launch) -> Observation:
        """What runs for `launch` now (recording an exit not yet recorded), rotating its log when it is due."""
        with self._lock:
            pf = self._read_pidfile(launch.name)
            running, history = self._settle(launch.name, pf, self._read_history(launch.name, launch.command_hash))
        self.rotate_log(launch)
        seen = Observation(running=running, pidfile=pf, history=history)
        if running:
            self._seen[launch.name] = (seen, launch)
        else:
            self._seen.pop(launch.name, None)
        return seen

    def rotate_log(self, launch: Launch) -> bool:
        """Rotate `launch`'s log if it has grown past its size; True if it did."""
        return rotate(self.log_path(launch.name), max_bytes=launch.log_max_bytes, backups=launch.log_backups)

    def logs_due(self) -> bool:
        """Whether the logs of the processes polled without reading files are due for a size check."""
        return time.monotonic() - self._logs_checked >= self.log_check_seconds

    def rotate_logs(self) -> None:
        """Check every watched process's log (one thread hop for all of them, not one each)."""
        self._logs_checked = time.monotonic()
        for _, launch in list(self._seen.values()):
            with contextlib.suppress(OSError):
                self.rotate_log(launch)

    def observe_cached(self, launch: Launch) -> Observation | None:
        """What `observe` would find, without reading a file, while nothing can have changed: the process is
        watched (it has not exited) and it is the one last observed, running `launch`. None otherwise. Never
        blocks: for the event loop. (The log is not checked: see `rotate_logs`.)"""
        found = self._seen.get(launch.name)
        watch = self._watches.get(launch.name)
        if found is None or watch is None:
            return None
        seen = found[0]
        pf = seen.pidfile
        if pf is None or (pf.pid, pf.start_time) != (watch.pid, watch.start_time):
            return None
        return seen if seen.history.command_hash == launch.command_hash else None

    def current(self, name: str) -> tuple[Pidfile | None, bool]:
        """`name`'s pidfile, and whether its process runs, without settling anything."""
        with self._lock:
            pf = self._read_pidfile(name)
        return pf, pf is not None and is_running(pf.pid, pf.start_time, pf.boot_id)

    def history(self, launch: Launch) -> History:
        with self._lock:
            return self._read_history(launch.name, launch.command_hash)

    def update_history(self, launch: Launch, change: Callable[[History], History]) -> History:
        self._seen.pop(launch.name, None)
        with self._lock:
            history = change(self._read_history(launch.name, launch.command_hash))
            self._write(self._history_path(launch.name), history)
            return history

    def start(self, launch: Launch, *, started_by: str, commit: Commit) -> Started:
        """Start `launch` unless it runs already (ExecutableNotAllowed, OSError when it cannot be)."""
        self._seen.pop(launch.name, None)
        with self._lock:
            pf = self._read_pidfile(launch.name)
            running, history = self._settle(launch.name, pf, self._read_history(launch.name, launch.command_hash))
            if running:
                assert pf is not None
                return Started(pid=pf.pid, start_time=pf.start_time, already=True)
            now = time.time()
            if pf is not None:  # it exited on its own: this start is a restart after a crash
                kept = [t for t in history.restarts if t > now - launch.window_seconds]
                history = history.model_copy(update={"restarts": [*kept, now]})
            child = self._spawn(launch, commit)
            found = identity(child.pid)
            self._children[child.pid] = child
            start_time = found.start_time if found is not None else 0
            self._write(
                self._pidfile_path(launch.name),
                Pidfile(
                    pid=child.pid, start_time=start_time, boot_id=boot_id(), command_hash=launch.command_hash,
                    started_at=now, started_by=started_by, stop_signal=launch.stop_signal,
                    stop_timeout_seconds=launch.stop_timeout_seconds,
                ),
            )  # fmt: skip
            self._write(self._history_path(launch.name), history)
        return Started(pid=child.pid, start_time=start_time, already=False)

    def _spawn(self, launch: Launch, commit: Commit) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        env = {"PATH": os.environ.get("PATH", os.defpath), **launch.env}
        uid = gid = groups = None
        if launch.user is not None:  # its own groups too: Popen(user=) alone would keep the daemon's
            entry = pwd.getpwnam(launch.user)
            uid, gid, groups = entry.pw_uid, entry.pw_gid, os.getgrouplist(launch.user, entry.pw_gid)
        executable = resolve_executable(launch.argv[0], path=None, patterns=self.allowed_executables)
        log_fd = os.open(self.log_path(launch.name), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            with commit():
                return subprocess.Popen(
                    list(launch.argv), executable=executable, env=env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                    stdout=log_fd, stderr=log_fd, start_new_session=True, close_fds=True, user=uid, group=gid,
                    extra_groups=groups,
                )  # fmt: skip
        finally:
            os.close(log_fd)

    def stop(self, name: str, *, commit: Commit) -> Pidfile | None:
        """Stop `name`'s process (its stop signal to its process group, SIGKILL after its stop timeout) and
        forget it: pidfile removed, restart history reset. The pidfile it had, or None when there was none."""
        self._seen.pop(name, None)
        with self._lock:
            pf = self._read_pidfile(name)
        if pf is not None:
            self._terminate(pf, commit)
        with self._lock, commit():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._pidfile_path(name))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._history_path(name))
        return pf

    def _terminate(self, pf: Pidfile, commit: Commit) -> None:
        try:
            fd = os.pidfd_open(pf.pid)
        except ProcessLookupError:
            return
        try:
            if not is_running(pf.pid, pf.start_time, pf.boot_id):
                return  # the pid is someone else's now (or a zombie): signal nobody
            with commit():
                _signal_group(fd, pf.pid, pf.stop_signal)
            if not _wait_fd(fd, pf.stop_timeout_seconds):
                _signal_group(fd, pf.pid, signal.SIGKILL)
                _wait_fd(fd, REAP_GRACE_SECONDS)
            self._remember_exit(self._reap(pf.pid, pf.start_time))
        finally:
            os.close(fd)

    def _reap(self, pid: int, start_time: int) -> ExitRecord:
        """Reap `pid` if it is our child (never blocks), and say how it ended, as far as that can be known."""
        holder = identity(pid)
        if holder is not None and holder.start_time != start_time:
            return _exit_record(pid, start_time, None)  # the pid is another process's now: reap nothing of it
        child = self._children.pop(pid, None)
        code: int | None = None
        if child is not None:
            code = child.poll()
        else:
            with contextlib.suppress(ChildProcessError):
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:
                    code = os.waitstatus_to_exitcode(status)
        return _exit_record(pid, start_time, code)

    def _remember_exit(self, record: ExitRecord) -> None:
        with self._exits_lock:
            self._exits[(record.pid, record.start_time)] = record
            while len(self._exits) > MAX_REMEMBERED_EXITS:  # exits nobody settled (stopped on purpose): oldest go
                del self._exits[next(iter(self._exits))]

    def _take_exit(self, pid: int, start_time: int) -> ExitRecord | None:
        with self._exits_lock:
            return self._exits.pop((pid, start_time), None)

    # -- exit watches (on the event loop) --------------------------------------------------------------------

    def subscribe(self, notify: Callable[[str], None]) -> None:
        """`notify(name)` is called on the event loop when a watched process exits."""
        self._notify = notify

    def watch(self, name: str, pid: int, start_time: int, boot: str) -> asyncio.Event:
        """An event set when the process `pid` (started at `start_time`) exits; set already when it is gone."""
        current = self._watches.get(name)
        if current is not None and (current.pid, current.start_time) == (pid, start_time):
            return current.exited
        if current is not None:
            self._unwatch(name, current)
        exited = asyncio.Event()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            exited.set()
            return exited
        if not is_running(pid, start_time, boot):  # checked after the pidfd pins the pid: then it is ours
            os.close(fd)
            exited.set()
            return exited
        watch = _Watch(pid=pid, start_time=start_time, fd=fd, exited=exited)
        self._watches[name] = watch
        asyncio.get_running_loop().add_reader(fd, self._on_exit, name, watch)
        return exited

    def _on_exit(self, name: str, watch: _Watch) -> None:
        self._unwatch(name, watch)
        self._seen.pop(name, None)
        if self.exit_of(watch.pid, watch.start_time) is None:  # a stop may have reaped it already
            self._remember_exit(self._reap(watch.pid, watch.start_time))
        watch.exited.set()
        self._notify(name)

    def _unwatch(self, name: str, watch: _Watch) -> None:
        if self._watches.get(name) is watch:
            del self._watches[name]
        with contextlib.suppress(ValueError, RuntimeError):  # the loop may be closed already
            asyncio.get_running_loop().remove_reader(watch.fd)
        with contextlib.suppress(OSError):
            os.close(watch.fd)

    def exit_of(self, pid: int, start_time: int) -> ExitRecord | None:
        """How the process `pid` (started at `start_time`) ended, when a watch or a stop saw it end."""
        with self._exits_lock:
            return self._exits.get((pid, start_time))

    def watching(self, name: str) -> bool:
        return name in self._watches

    def close(self) -> None:
        """Stop watching every process (they go on running)."""
        for name, watch in list(self._watches.items()):
            self._unwatch(name, watch)


def _signal_group(fd: int, pid: int, signum: int) -> None:
    """`signum` to the process the pidfd `fd` holds, then to the group it leads (its own session). The leader is
    signalled through its pidfd, which a reused pid cannot fool. The group is signalled by number: Linux does not
    hand a pid out again while any process of the group it numbers is alive, so only a group already empty, whose
    number went to a new group leader within these microseconds, could be mistaken."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, signum)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)  # what the leader started; also when the leader itself already exited


def _wait_fd(fd: int, timeout: float) -> bool:
    """Wait until the pidfd `fd` is readable (its process exited); False after `timeout` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True

