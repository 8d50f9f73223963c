"""One scenario's test rig: its own etcd, a `setpoint run` daemon process on it, and what is read from outside.

The etcd keeps its data on the temporary directory's disk with fsync, as in
production (etcd's defaults, but a backend quota of 8 GiB: nothing is
compacted, so history replay and 100,000-key runs fit). The daemon runs as
a process of its own with the settings a scenario asks for, every limit
that would hold the engine back lifted (flap guard, mutation budget,
max-unhealthy pause, the reconcile rate limit), logging at `info` (the
default) to a file. Figures about the daemon are read the way an operator
would: `/metrics`, `/readyz`, `/proc/<pid>/{stat,status}` and its statuses
in etcd (`StatusWatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd, free_port
from reconciler.keys import KeySpace, Section
from reconciler.store import EtcdStore, range_end

PREFIX = "/bench"
TICKS = os.sysconf("SC_CLK_TCK")
LIFTED_POLICIES = {
    "limits": {
        "flap_max_plans": 1_000_000, "max_mutating_steps_per_minute": 1_000_000, "max_unhealthy_fraction": 1.0,
        "max_unhealthy_min_count": 1_000_000,
    },
}  # fmt: skip
QUOTA_BYTES = 8 * 1024**3


class BenchEtcd(EmbeddedEtcd):
    """An `EmbeddedEtcd` with room for a long uncompacted history."""

    def _command(self) -> list[str]:
        return [*super()._command(), f"--quota-backend-bytes={QUOTA_BYTES}"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used (all its threads)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    """`VmRSS` of `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric_sum(text: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) in Prometheus text `text`; 0 when absent."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def file_resource(root: Path, name: str, content: str) -> bytes:
    """A desired `file` resource's value."""
    value = {"kind": "file", "name": name, "spec": {"path": str(root / name), "content": content}}
    return json.dumps(value).encode()


@dataclass
class DaemonOptions:
    """What a scenario changes in the daemon's settings; everything else is at its default."""

    workers: int = 4
    resync_seconds: float | None = None
    file_poll_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the settings at the top level
    env: dict[str, str] = field(default_factory=dict)


class Rig:
    """`async with Rig(base) as rig:` starts etcd and connects `rig.store`; `start_daemon` starts the daemon.
    Leaving stops both (SIGTERM, then SIGKILL after 30 s)."""

    def __init__(self, base: Path, options: DaemonOptions | None = None) -> None:
        self.base = base
        self.options = options or DaemonOptions()
        self.keys = KeySpace(PREFIX)
        self.files = base / "files"
        self.etcd = BenchEtcd(base / "etcd" / "data", log_path=base / "etcd" / "etcd.log")
        self.store: EtcdStore | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.port = free_port()
        self.log_path = base / "daemon.log"
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Rig:
        self.files.mkdir(parents=True, exist_ok=True)
        await self.etcd.astart()
        self.store = EtcdStore([self.etcd.endpoint], timeout=30.0)
        await self.store.connect()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop_daemon()
        finally:
            if self._http is not None:
                await self._http.close()
            if self.store is not None:
                with contextlib.suppress(Exception):
                    await self.store.close()
            await asyncio.to_thread(self.etcd.stop)

    @property
    def db(self) -> EtcdStore:
        assert self.store is not None, "the rig is not started"
        return self.store

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon is not started"
        return self.proc.pid

    def desired_key(self, name: str, kind: str = "file") -> str:
        return self.keys.desired(ResourceKey(kind=kind, name=name))

    def settings(self) -> dict[str, Any]:
        o = self.options
        policies = self.base / "policies.yaml"
        policies.write_text(yaml.safe_dump(LIFTED_POLICIES))
        reconciler: dict[str, Any] = {"workers": o.workers, "rate_limit_per_second": 1_000_000}
        if o.resync_seconds is not None:
            reconciler["resync_seconds"] = o.resync_seconds
        file_agent: dict[str, Any] = {"allowed_roots": [str(self.files)]}
        if o.file_poll_seconds is not None:
            file_agent["poll_seconds"] = o.file_poll_seconds
        settings: dict[str, Any] = {
            "etcd": {"endpoints": [self.etcd.endpoint], "prefix": PREFIX},
            "http": {"listen": f"127.0.0.1:{self.port}"},
            "state_dir": str(self.base / "state"),
            "reconciler": reconciler,
            "agents": {"file": file_agent},
            "policies": {"file": str(policies)},
            "log": {"level": "info"},
        }
        settings.update(o.extra)
        return settings

    async def start_daemon(self) -> float:
        """Start `setpoint run`; returns the `time.perf_counter()` at which it was spawned."""
        config = self.base / "setpoint.yaml"
        config.write_text(yaml.safe_dump(self.settings()))
        out = self._open_log()  # handed to the child, closed after
        try:
            spawned = time.perf_counter()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "reconciler.cli", "run", "-c", str(config), stdout=out, stderr=out,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True, env={**os.environ, **self.options.env},
            )  # fmt: skip
        finally:
            out.close()
        return spawned

    def _open_log(self) -> Any:
        return open(self.log_path, "ab")

    async def stop_daemon(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def alive(self) -> None:
        """Raise when the daemon has exited (a scenario must not wait on a dead daemon)."""
        if self.proc is not None and self.proc.returncode is not None:
            raise RuntimeError(f"the daemon exited with code {self.proc.returncode}; see {self.log_path}")

    async def ready(self) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def wait_ready(self, timeout: float, *, every: float = 0.02) -> float:
        """Poll `/readyz` until it answers 200; the `time.perf_counter()` when it did."""
        deadline = time.perf_counter() + timeout
        while True:
            self.alive()
            if await self.ready():
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the daemon was not ready within {timeout:g} s; see {self.log_path}")
            await asyncio.sleep(every)

    async def metrics(self) -> str:
        assert self._http is not None
        async with self._http.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    async def metric(self, name: str) -> float:
        """The sum of `name`'s samples on `/metrics` (e.g. `setpoint_reconcile_total`)."""
        return metric_sum(await self.metrics(), name)

    async def revision(self) -> int:
        return await self.db.ping(self.keys.section(Section.DESIRED).encode())

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)


class StatusWatch:
    """Follows `status/<kind>/` from a revision: for each name, the last revision it was `Converged` at and when
    (`time.perf_counter()`) that status arrived here. `on_converged(name, revision, at)` hears each such status;
    `wait` waits until every name of a map has converged at (or past) its revision."""

    def __init__(self, rig: Rig, *, kind: str = "file") -> None:
        self._rig = rig
        self._start = (rig.keys.section(Section.STATUS) + kind + "/").encode()
        self.converged: dict[str, tuple[int, float]] = {}
        self.on_converged: Callable[[str, int, float], None] = lambda name, revision, at: None
        self._changed = asyncio.Event()  # set when the current wait's last name converged
        self._expected: dict[str, int] = {}
        self._remaining: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatusWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def start(self, from_revision: int) -> None:
        self._task = asyncio.create_task(self._follow(from_revision), name="status-watch")

    async def _follow(self, revision: int) -> None:
        stream = self._rig.db.watch(self._start, range_end(self._start), start_revision=revision)
        async with contextlib.aclosing(stream):
            async for batch in stream:
                now = time.perf_counter()
                for event in batch.events:
                    if event.type != "put":
                        continue
                    status = json.loads(event.kv.value)
                    if status.get("phase") != "Converged":
                        continue
                    name = event.kv.key[len(self._start) :].decode()
                    observed = int(status["observed_revision"])
                    if observed >= self.converged.get(name, (0, 0.0))[0]:
                        self.converged[name] = (observed, now)
                        self.on_converged(name, observed, now)
                        if name in self._remaining and observed >= self._expected[name]:
                            self._remaining.discard(name)
                if not self._remaining:
                    self._changed.set()

    def missing(self, expected: dict[str, int]) -> int:
        """How many names of `expected` have not converged at (or past) their revision."""
        return sum(1 for name, rev in expected.items() if self.converged.get(name, (0, 0.0))[0] < rev)

    async def wait(self, expected: dict[str, int], *, timeout: float) -> tuple[bool, float]:
        """Wait until every name in `expected` converged at its revision or later, at most `timeout` seconds;
        (all converged, `time.perf_counter()` of the last one seen or of the give-up). One wait at a time."""
        deadline = time.perf_counter() + timeout
        self._expected = expected
        self._remaining = {name for name, rev in expected.items() if self.converged.get(name, (0, 0.0))[0] < rev}
        try:
            while self._remaining:
                if self._task is not None and self._task.done():
                    self._task.result()  # the watch failed: say why
                    raise RuntimeError("the status watch ended")
                self._rig.alive()
                self._changed.clear()
                left = deadline - time.perf_counter()
                if left <= 0:
                    return False, time.perf_counter()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        finally:
            self._expected, self._remaining = {}, set()
        last = max((self.converged[name][1] for name in expected), default=time.perf_counter())
        return True, last
