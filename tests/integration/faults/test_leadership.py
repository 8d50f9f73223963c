"""Three real daemons on one prefix (issue 11): one leads; a killed leader is replaced; a frozen one changes nothing.

Each daemon is `counting_daemon.py` (a 3-step job whose tools count their calls, with the pid, in the job's
directory), with leases of 3 s, a renew deadline of 2 s and a try every 0.5 s. Who leads is read from
`<prefix>/leader`, `/readyz` and `setpoint_leader`. "Writes nothing" is checked on a watch of the whole prefix:
after the frozen leader is let go, the only key that changes is its own `members/<id>` (a new lease, as it
stands by again). Times are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import eventually

from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore, WatchEvent, range_end

DAEMON = Path(__file__).with_name("counting_daemon.py")
ELECTION = {"lease_seconds": 3, "renew_seconds": 2, "retry_seconds": 0.5}


class Daemon:
    """One counting daemon process, its JSON log in a file."""

    def __init__(self, name: str, etcd: EmbeddedEtcd, prefix: str, tmp: Path) -> None:
        self.name = name
        self.config = tmp / f"{name}.yaml"
        self.log = tmp / f"{name}.log"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix},
                    "http": {"listen": "127.0.0.1:0"},
                    "reconciler": {"workers": 1, "resync_seconds": 300},
                    "election": {**ELECTION, "member_id": name},
                    "state_dir": str(tmp / f"state-{name}"),
                    "log": {"level": "info"},
                }
            )
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - opened once, handed to the child
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(DAEMON), str(self.config), stdout=log, stderr=log
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in events if name is None or e["event"] == name]

    async def wait_event(self, name: str, *, after: int = 0, timeout: float = 30) -> dict[str, Any]:
        """The first `name` event past the first `after` events of the log."""

        async def found() -> dict[str, Any] | None:
            return next((e for e in self.events()[after:] if e["event"] == name), None)

        event: dict[str, Any] = await eventually(found, timeout=timeout, what=f"{name} in {self.name}'s log")
        return event

    def port(self) -> int:
        listening = self.events("http.listening")
        assert listening, f"{self.name} is not listening yet"
        return int(listening[0]["address"].rpartition(":")[2])

    async def get(self, path: str) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port()}{path}", timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        return await asyncio.to_thread(fetch)

    async def readyz(self) -> str:
        code, body = await self.get("/readyz")
        return body.strip() if code == 200 else f"{code} {body.strip()}"

    async def metric(self, sample: str) -> float | None:
        _, text = await self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.proc.terminate()
            assert await asyncio.wait_for(self.proc.wait(), 30) == 0, f"{self.name} did not stop cleanly"


class Ha:
    def __init__(self, etcd: EmbeddedEtcd, store: EtcdStore, tmp: Path) -> None:
        self.prefix = f"/ha-{uuid.uuid4().hex[:8]}"
        self.keys = KeySpace(self.prefix)
        self.store = store
        self.tmp = tmp
        self.daemons = [Daemon(f"d{i}", etcd, self.prefix, tmp) for i in range(3)]

    def job_dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    async def start(self) -> None:
        for daemon in self.daemons:
            await daemon.start()
        for daemon in self.daemons:
            await daemon.wait_event("daemon.ready")

    async def desire(self, directory: Path) -> int:
        value = {"kind": "job", "name": "work", "spec": {"dir": str(directory), "verifiable": True}}
        return await self.store.put(f"{self.prefix}/desired/job/work", json.dumps(value).encode())

    async def status(self) -> dict[str, Any] | None:
        kv = await self.store.get(f"{self.prefix}/status/job/work")
        return json.loads(kv.value) if kv else None

    async def converged(self, revision: int, timeout: float = 30) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.status()
            ok = status and status["phase"] == "Converged" and status["observed_revision"] == revision
            return status if ok else None

        status: dict[str, Any] = await eventually(check, timeout=timeout, what=f"Converged at {revision}")
        return status

    async def record(self, plan_id: str) -> dict[str, Any]:
        kv = await self.store.get(self.keys.plan(plan_id))
        assert kv is not None
        return dict(json.loads(kv.value))

    async def leader(self) -> Daemon | None:
        kv = await self.store.get(f"{self.prefix}/leader")
        if kv is None:
            return None
        name = json.loads(kv.value)["id"]
        return next(d for d in self.daemons if d.name == name)

    async def new_leader(self, old: Daemon | None = None, timeout: float = 30) -> Daemon:
        async def check() -> Daemon | None:
            leader = await self.leader()
            return leader if leader is not None and leader is not old else None

        leader: Daemon = await eventually(check, timeout=timeout, what="a leader other than the old one")
        return leader

    async def quiet(self, seconds: float = 1.0) -> int:
        """Wait until nothing has been written to etcd for `seconds`; the revision then."""
        last, since = await self.store.ping(), time.monotonic()
        while time.monotonic() - since < seconds:
            await asyncio.sleep(0.1)
            now = await self.store.ping()
            if now != last:
                last, since = now, time.monotonic()
        return last


def calls(directory: Path) -> list[tuple[str, int]]:
    path = directory / "calls_by.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(step, int(pid)) for step, pid in (line.split() for line in lines)]


class Writes:
    """Every change under a prefix from a revision on, as a watch sees it."""

    def __init__(self, store: EtcdStore, prefix: str, after: int) -> None:
        self.events: list[WatchEvent] = []
        start = (prefix + "/").encode()
        self._task = asyncio.create_task(self._collect(store.watch(start, range_end(start), start_revision=after + 1)))

    async def _collect(self, stream: Any) -> None:
        async for batch in stream:
            self.events.extend(batch.events)

    def keys(self) -> list[str]:
        return [f"{e.type} {e.kv.key.decode()}" for e in self.events]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def ha(etcd: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[Ha]:
    async with EtcdStore([etcd.endpoint]) as store:
        h = Ha(etcd, store, tmp_path)
        try:
            yield h
        finally:
            for daemon in h.daemons:
                if daemon.proc is not None and daemon.proc.returncode is None:
                    daemon.signal(signal.SIGCONT)
                    daemon.proc.kill()
                    await daemon.proc.wait()


async def who_leads(ha: Ha) -> Daemon:
    """The one daemon that leads, by the leader key, /readyz and the gauge, all three agreeing."""
    leader = await ha.new_leader()
    gauge = f'setpoint_leader{{prefix="{ha.prefix}"}}'

    async def agreed() -> bool:
        said = {d.name: (await d.readyz(), await d.metric(gauge)) for d in ha.daemons}
        want = {d.name: ("ready: leader", 1.0) if d is leader else ("ready: standby", 0.0) for d in ha.daemons}
        return said == want

    await eventually(agreed, timeout=15, what=f"{leader.name} alone to say it leads")
    return leader


async def test_of_three_daemons_exactly_one_leads_and_only_it_acts(ha: Ha) -> None:
    await ha.start()
    leader = await who_leads(ha)
    members, _ = await ha.store.get_prefix(f"{ha.prefix}/members/")
    assert sorted(json.loads(kv.value)["id"] for kv in members) == ["d0", "d1", "d2"]

    job = ha.job_dir("job")
    revision = await ha.desire(job)
    await ha.converged(revision)
    assert calls(job) == [("prepare", leader.pid), ("launch", leader.pid), ("finish", leader.pid)]
    for daemon in ha.daemons:
        await daemon.stop()
    assert await ha.store.get(f"{ha.prefix}/leader") is None, "a clean stop revokes the lease"


async def test_a_killed_leader_is_replaced_and_a_change_made_meanwhile_converges(ha: Ha) -> None:
    await ha.start()
    old = await who_leads(ha)
    first = ha.job_dir("first")
    await ha.converged(await ha.desire(first))

    old.signal(signal.SIGKILL)
    killed = time.monotonic()
    second = ha.job_dir("second")
    revision = await ha.desire(second)  # while nobody leads
    status = await ha.converged(revision)
    print(f"\nSIGKILL to the change converged by the next leader: {time.monotonic() - killed:.2f} s "
          f"(lease {ELECTION['lease_seconds']} s)")  # fmt: skip

    new = await ha.leader()
    assert new is not None and new is not old
    record = await ha.record(status["plan_id"])
    assert record["state"] == "succeeded"
    assert calls(second) == [("prepare", new.pid), ("launch", new.pid), ("finish", new.pid)]
    assert [step for step, _ in calls(first)] == ["prepare", "launch", "finish"], "nothing ran twice"
    for daemon in ha.daemons:
        if daemon is not old:
            await daemon.stop()


async def _let_go(ha: Ha, frozen: Daemon, new: Daemon) -> list[str]:
    """SIGCONT `frozen` once etcd is quiet; wait until it stands by again under `new`; the writes meanwhile."""
    seen = len(frozen.events())
    writes = Writes(ha.store, ha.prefix, after=await ha.quiet())
    try:
        frozen.signal(signal.SIGCONT)
        lost = await frozen.wait_event("election.lost", after=seen)
        await frozen.wait_event("daemon.standing_down", after=seen)
        standby = await frozen.wait_event("election.standby", after=seen)
        assert standby["leader"] == new.name
        assert await frozen.readyz() == "ready: standby"
        print(f"\n{frozen.name} woke up and stepped down: {lost['reason']}")
        await ha.quiet()  # whatever it would still do, it has had the time to
    finally:
        await writes.close()
    return writes.keys()


async def test_a_frozen_leader_writes_nothing_and_runs_nothing_when_it_wakes(ha: Ha) -> None:
    await ha.start()
    old = await who_leads(ha)
    first = ha.job_dir("first")
    await ha.converged(await ha.desire(first))

    old.signal(signal.SIGSTOP)
    new = await ha.new_leader(old)  # once its lease has expired
    second = ha.job_dir("second")
    revision = await ha.desire(second)
    status = await ha.converged(revision)  # the new leader acted
    assert (await ha.record(status["plan_id"]))["state"] == "succeeded"

    writes = await _let_go(ha, old, new)
    assert writes == [f"put {ha.prefix}/members/{old.name}"], "the old leader wrote something besides its membership"
    assert calls(second) == [("prepare", new.pid), ("launch", new.pid), ("finish", new.pid)]
    assert (await ha.status() or {})["observed_revision"] == revision
    print(f"{old.name} tried {len(old.events('reconcile.not_leader'))} writes after it woke, all refused")
    for daemon in ha.daemons:
        await daemon.stop()


async def test_a_leader_frozen_inside_a_step_finishes_that_step_and_starts_no_other(ha: Ha) -> None:
    """The one thing fencing cannot stop: a step already running when the leader froze. It finishes when the
    leader wakes (its tool is idempotent, so the new leader ran it again too); nothing after it runs, and its
    journal write is refused."""
    await ha.start()
    old = await who_leads(ha)
    job = ha.job_dir("job")
    (job / "pause_at").write_text("prepare:before")
    revision = await ha.desire(job)

    async def paused() -> bool:
        return (job / "paused").exists()

    await eventually(paused, what="the leader inside its first step")
    assert int((job / "paused").read_text()) == old.pid
    old.signal(signal.SIGSTOP)
    (job / "pause_at").unlink()  # the new leader's own call does not wait
    new = await ha.new_leader(old)
    status = await ha.converged(revision)
    record = await ha.record(status["plan_id"])
    assert record["state"] == "succeeded"
    assert "cut off by a restart" in record["steps"][0]["message"], "the new leader resumed the old one's plan"
    assert calls(job) == [("prepare", new.pid), ("launch", new.pid), ("finish", new.pid)]

    writes = await _let_go(ha, old, new)
    assert writes == [f"put {ha.prefix}/members/{old.name}"], "the old leader wrote something besides its membership"
    # Its step finished (an effect outside etcd cannot be fenced); it started no other.
    assert calls(job) == [("prepare", new.pid), ("launch", new.pid), ("finish", new.pid), ("prepare", old.pid)]
    refused = old.events("reconcile.not_leader")
    assert refused, "its journal write after the step was refused"
    assert (await ha.record(status["plan_id"])) == record, "the plan record is the new leader's"
    for daemon in ha.daemons:
        await daemon.stop()
