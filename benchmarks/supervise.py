"""setpoint's `process` agent side by side with supervisord, in one run on one machine.

    python -m benchmarks.supervise [--processes 100] [--kills 100] [--idle-seconds 30] [--json]

Both supervise N `sleep` processes at once (supervisord's with argv
`sleep 7<run><i>`, setpoint's with `sleep 8<run><i>`, `<run>` from the
benchmark's pid, so each process is known by its argv, and no other run's).
SIGTERM stops everything it started, as ^C does. Then:

1. restart time: for each supervisor in turn, managed processes are killed
   with SIGKILL one at a time, each kill a different process (round robin
   when there are more kills than processes), and the time from the kill to
   the moment the supervisor has a new child with the same argv (it has
   exec'd) is measured by watching `/proc` every millisecond. The next kill waits until
   the last restart has settled (`--spacing`), so restarts never overlap.
2. idle CPU: user + system time (`/proc/<pid>/stat` fields 14 and 15) of
   supervisord, of the setpoint daemon, and of its etcd, over the same
   `--idle-seconds`, while both supervise their N processes and nothing
   happens; setpoint is reported without and with its etcd.

Fairness: supervisord runs with `autorestart=true` and `startsecs=0` (a
process counts as started at once), each program's output to a log file;
setpoint's resources have `start_seconds: 0` likewise, and everything else
at its defaults (poll every 10 s, 4 workers). setpoint's flap guard,
mutation budget and max-unhealthy pause are lifted by a policy file, so its
limits do not interfere with a benchmark that kills on purpose. setpoint
runs as a daemon process of its own (`setpoint run`) against an etcd the
benchmark starts (its data on the temporary directory's disk, with fsync, as
in production; etcd's default heartbeat). Each restart in setpoint is a
plan: journalled in etcd before and after its step, like any other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.rig import LIFTED_POLICIES, PREFIX, TICKS
from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore
from tools.proc import cmdline, identity

SLEEP = os.path.realpath(shutil.which("sleep") or "/usr/bin/sleep")
# In every argv, so a process left by another run (or anyone's `sleep`) is never taken for, or killed as, ours.
RUN = f"{os.getpid() % 100000:05d}"


@dataclass
class Supervised:
    """One supervisor under test: its process, and the argv of each process it keeps running."""

    name: str
    pid: int
    argvs: list[list[str]]
    helpers: dict[str, int] = field(default_factory=dict)  # other processes it needs (setpoint's etcd)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used (all its threads; not its children)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def find(argvs: list[list[str]]) -> dict[tuple[str, ...], int]:
    """The live processes running each of `argvs`, by argv."""
    wanted = {tuple(argv) for argv in argvs}
    found: dict[tuple[str, ...], int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = cmdline(int(entry))
        if argv is not None and tuple(argv) in wanted:
            who = identity(int(entry))
            if who is not None and not who.zombie:
                found[tuple(argv)] = int(entry)
    return found


def wait_running(argvs: list[list[str]], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while len(find(argvs)) < len(argvs):
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: only {len(find(argvs))} of {len(argvs)} processes running after {timeout:g} s")
        time.sleep(0.1)


def children(pid: int) -> set[int]:
    """The children of `pid`, started by any of its threads."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            found.update(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def restart_time(supervisor: int, argv: list[str], *, timeout: float) -> float | None:
    """Kill the process running `argv`; seconds until `supervisor` has a new child with that argv (exec'd), None
    after `timeout`. Children, not all of /proc, are watched: pids wrap, and a new process may take a pid that was
    in use a moment before."""
    pid = find([argv]).get(tuple(argv))
    killed = identity(pid) if pid is not None else None
    if pid is None or killed is None:
        return None
    known = children(supervisor) - {pid}
    fresh: set[int] = set()
    started = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while time.perf_counter() - started < timeout:
        now = children(supervisor)
        fresh |= now - known
        known |= now
        fresh.add(pid)  # the killed pid itself may come back, as a new process
        for candidate in list(fresh):
            if cmdline(candidate) == argv:  # a fork shows its parent's argv, or none, until it execs
                who = identity(candidate)
                if who is not None and not who.zombie and (candidate, who.start_time) != (pid, killed.start_time):
                    return time.perf_counter() - started
            elif candidate != pid and identity(candidate) is None:
                fresh.discard(candidate)
        time.sleep(0.001)
    return None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def kill_series(sup: Supervised, *, kills: int, spacing: float, timeout: float) -> dict[str, Any]:
    times: list[float] = []
    missed = 0
    for k in range(kills):
        took = restart_time(sup.pid, sup.argvs[k % len(sup.argvs)], timeout=timeout)
        if took is None:
            missed += 1
        else:
            times.append(took)
        time.sleep(spacing)
    summary: dict[str, Any] = {"kills": kills, "restarted": len(times), "missed": missed}
    if times:
        summary.update(p50_ms=percentile(times, 50) * 1000, p99_ms=percentile(times, 99) * 1000,
                       max_ms=max(times) * 1000, mean_ms=sum(times) / len(times) * 1000)  # fmt: skip
    return summary


# -- supervisord -------------------------------------------------------------------------------------------------


def start_supervisord(base: Path, n: int) -> tuple[subprocess.Popen[bytes], Supervised]:
    logs = base / "logs"
    logs.mkdir(parents=True)
    argvs = [[SLEEP, f"7{RUN}{i:06d}"] for i in range(n)]
    lines = [
        "[supervisord]", "nodaemon=true", f"logfile={base / 'supervisord.log'}", f"pidfile={base / 'supervisord.pid'}",
        f"childlogdir={logs}", "loglevel=warn", "",
    ]  # fmt: skip
    for i, argv in enumerate(argvs):
        lines += [
            f"[program:nap{i}]", f"command={' '.join(argv)}", "autorestart=true", "startsecs=0", "startretries=3",
            f"stdout_logfile={logs / f'nap{i}.log'}", "redirect_stderr=true", "",
        ]  # fmt: skip
    config = base / "supervisord.conf"
    config.write_text("\n".join(lines))
    out = open(base / "supervisord.out", "ab")  # handed to the child, closed after
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    out.close()
    return proc, Supervised(name="supervisord", pid=proc.pid, argvs=argvs)


# -- setpoint ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _apply(endpoint: str, argvs: list[list[str]]) -> None:
    keys = KeySpace(PREFIX)
    async with EtcdStore([endpoint]) as store:
        items = []
        for i, argv in enumerate(argvs):
            key = ResourceKey(kind="process", name=f"nap{i}")
            value = {"kind": "process", "name": key.name, "spec": {"command": argv, "start_seconds": 0}}
            items.append((keys.desired(key), json.dumps(value).encode()))
        for start in range(0, len(items), 64):  # etcd's default limit on operations per transaction is 128
            await store.put_all(items[start : start + 64])


def start_setpoint(base: Path, n: int) -> tuple[subprocess.Popen[bytes], EmbeddedEtcd, Supervised]:
    etcd = EmbeddedEtcd(base / "etcd" / "data", log_path=base / "etcd" / "etcd.log")
    etcd.start()
    policies = base / "policies.yaml"
    policies.write_text(yaml.safe_dump(LIFTED_POLICIES))
    settings = {
        "etcd": {"endpoints": [etcd.endpoint], "prefix": PREFIX},
        "http": {"listen": f"127.0.0.1:{_free_port()}"},
        "state_dir": str(base / "state"),
        "agents": {"process": {"allowed_executables": [SLEEP]}},
        "policies": {"file": str(policies)},
        "log": {"level": "warning"},
    }
    config = base / "setpoint.yaml"
    config.write_text(yaml.safe_dump(settings))
    argvs = [[SLEEP, f"8{RUN}{i:06d}"] for i in range(n)]
    out = open(base / "setpoint.out", "ab")  # handed to the child, closed after
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.cli", "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    out.close()
    asyncio.run(_apply(etcd.endpoint, argvs))
    assert etcd.pid is not None
    return proc, etcd, Supervised(name="setpoint", pid=proc.pid, argvs=argvs, helpers={"etcd": etcd.pid})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_left(argvs: list[list[str]]) -> None:
    """setpoint's processes outlive it on purpose: end them."""
    for pid in find(argvs).values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def supervisors(base: Path, n: int) -> Iterator[tuple[Supervised, Supervised]]:
    sv_proc, sv = start_supervisord(base / "supervisord", n)
    sp_proc: subprocess.Popen[bytes] | None = None
    etcd: EmbeddedEtcd | None = None
    sp: Supervised | None = None
    try:
        sp_proc, etcd, sp = start_setpoint(base / "setpoint", n)
        wait_running(sv.argvs, timeout=60, what="supervisord")
        wait_running(sp.argvs, timeout=120, what=f"setpoint (see {base / 'setpoint' / 'setpoint.out'})")
        yield sv, sp
    finally:
        _stop(sv_proc)
        if sp_proc is not None:
            _stop(sp_proc)
        if sp is not None:
            _kill_left(sp.argvs)
        if etcd is not None:
            etcd.stop()


def idle_cpu(sups: list[Supervised], seconds: float) -> dict[str, float]:
    pids = {sup.name: sup.pid for sup in sups}
    pids.update({f"{sup.name}.{name}": pid for sup in sups for name, pid in sup.helpers.items()})
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def run(
    *, processes: int, kills: int, idle_seconds: float, spacing: float, timeout: float, keep: bool
) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="setpoint-bench-"))
    try:
        with supervisors(base, processes) as (sv, sp):
            time.sleep(2.0)  # setpoint's last start plans settle
            restarts = {sup.name: kill_series(sup, kills=kills, spacing=spacing, timeout=timeout) for sup in (sv, sp)}
            time.sleep(2.0)
            cpu = idle_cpu([sv, sp], idle_seconds)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    pct = {name: used / idle_seconds * 100 for name, used in cpu.items()}
    return {
        "processes": processes, "kills": kills, "idle_seconds": idle_seconds, "spacing_seconds": spacing,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "supervisord": {"restart": restarts["supervisord"], "idle_cpu_seconds": cpu["supervisord"],
                        "idle_cpu_percent": pct["supervisord"]},
        "setpoint": {
            "restart": restarts["setpoint"], "idle_cpu_seconds": cpu["setpoint"], "idle_cpu_percent": pct["setpoint"],
            "etcd_idle_cpu_seconds": cpu["setpoint.etcd"], "etcd_idle_cpu_percent": pct["setpoint.etcd"],
            "with_etcd_idle_cpu_percent": pct["setpoint"] + pct["setpoint.etcd"],
        },
        "work_dir": str(base) if keep else None,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    sv, sp = result["supervisord"], result["setpoint"]

    def ms(side: dict[str, Any], key: str) -> str:
        value = side["restart"].get(key)
        return f"{value:.1f}" if value is not None else "-"

    rows = [
        ("restart p50 (ms)", ms(sv, "p50_ms"), ms(sp, "p50_ms")),
        ("restart p99 (ms)", ms(sv, "p99_ms"), ms(sp, "p99_ms")),
        ("restart max (ms)", ms(sv, "max_ms"), ms(sp, "max_ms")),
        ("restarted / kills", f"{sv['restart']['restarted']}/{sv['restart']['kills']}",
         f"{sp['restart']['restarted']}/{sp['restart']['kills']}"),
        ("idle CPU, % of a core", f"{sv['idle_cpu_percent']:.2f}", f"{sp['idle_cpu_percent']:.2f}"),
        ("idle CPU with etcd, %", "-", f"{sp['with_etcd_idle_cpu_percent']:.2f}"),
    ]  # fmt: skip
    head = (f"{result['processes']} processes, {result['kills']} kills, idle CPU over {result['idle_seconds']:g} s, "
            f"{result['machine']['cpus']} CPUs, Linux {result['machine']['kernel']}")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [head, f"{'':{width}}  {'supervisord':>12}  {'setpoint':>12}"]
    lines += [f"{name:{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
    return "\n".join(lines)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=100, help="processes each supervisor keeps running")
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs per supervisor")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="how long idle CPU is measured")
    parser.add_argument("--spacing", type=float, default=0.5, help="seconds between a restart and the next kill")
    parser.add_argument("--timeout", type=float, default=15.0, help="a restart not seen after this long is missed")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, configs)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # cleaned up like ^C: supervisors, etcd and processes stopped
    if args.processes < 1 or args.kills < 1 or args.idle_seconds <= 0:
        parser.error("--processes and --kills must be at least 1, --idle-seconds above 0")
    result = run(processes=args.processes, kills=args.kills, idle_seconds=args.idle_seconds, spacing=args.spacing,
                 timeout=args.timeout, keep=args.keep)  # fmt: skip
    if not args.json:
        print(table(result))
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
