"""A real multi-member etcd cluster on loopback, for the tests of failover.

Each member is an `EmbeddedEtcd` with its own free client and peer ports,
data directory and log, and etcd's short test timings (`fast`: heartbeat
10 ms, election 50 ms). `start()` spawns every member first and only then
waits for each to answer `/health`: a member is healthy once a quorum runs
and has a leader. A member can be SIGKILLed (`member.kill()`) and started
again on the same ports and data (`await member.astart()`), as a crash and a
recovery would.

`leader()`, `move_leader()` and `watched()` (the members serving a watch
stream, by their own metrics) ask the members over HTTP (etcd's JSON gateway
and `/metrics`), so a test can aim at a member without going through the
client under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.embedded import EmbeddedEtcd, EmbeddedEtcdError, free_port


class EtcdCluster:
    """`size` etcd members on loopback, one cluster; see the module docstring."""

    def __init__(self, base: Path, *, size: int = 3, fast: bool = True) -> None:
        names = [f"m{i}" for i in range(size)]
        peers = {name: free_port() for name in names}
        initial = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peers.items())
        self.members = [
            EmbeddedEtcd(
                base / name / "data",
                name=name,
                peer_port=peers[name],
                initial_cluster=initial,
                fast=fast,
                log_path=base / name / "etcd.log",
            )
            for name in names
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint, `127.0.0.1:PORT`."""
        return [m.endpoint for m in self.members]

    @property
    def host_endpoints(self) -> list[str]:
        """Every member's client endpoint by host name, `localhost:PORT`."""
        return [f"localhost:{m.client_port}" for m in self.members]

    def start(self, *, timeout: float = 30.0) -> None:
        """Spawn every member, then wait until each is healthy. Call from the main thread (see `spawn_child`)."""
        for member in self.members:
            member.spawn()
        for member in self.members:
            member.wait_healthy(timeout)

    def stop(self) -> None:
        """Stop every member, a SIGSTOPped one included."""
        for pid in [m.pid for m in self.members]:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        for member in self.members:
            member.stop()

    def leader(self) -> EmbeddedEtcd:
        """The member that leads now, by the running members' own word; LookupError while they do not agree."""
        ids: dict[int, EmbeddedEtcd] = {}
        leaders: set[int] = set()
        for member in self.running():
            with contextlib.suppress(OSError, ValueError):
                status = _post(member, "/v3/maintenance/status", {})
                ids[int(status["header"]["member_id"])] = member
                leaders.add(int(status["leader"]))
        known = [ids[i] for i in leaders if i in ids]
        if len(leaders) != 1 or not known:
            raise LookupError(f"the running members do not agree on one running leader: {sorted(leaders)}")
        return known[0]

    def running(self) -> list[EmbeddedEtcd]:
        return [m for m in self.members if m.pid is not None]

    def move_leader(self, to: EmbeddedEtcd) -> None:
        """Hand the leadership to `to` (etcd's MoveLeader, asked of the current leader)."""
        target = _post(to, "/v3/maintenance/status", {})["header"]["member_id"]
        _post(self.leader(), "/v3/maintenance/transfer-leadership", {"targetID": target})

    def watch_streams(self, member: EmbeddedEtcd) -> int:
        """How many watch streams `member` serves, by its own metrics."""
        with urllib.request.urlopen(f"http://{member.endpoint}/metrics", timeout=2) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watch_stream_total "):
                    return int(float(line.split()[1]))
        raise LookupError(f"etcd at {member.endpoint} reports no etcd_debugging_mvcc_watch_stream_total")

    def watched(self) -> list[EmbeddedEtcd]:
        """The running members that serve at least one watch stream."""
        return [m for m in self.running() if self.watch_streams(m) > 0]


def _post(member: EmbeddedEtcd, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A call to etcd's JSON gateway for gRPC on `member`'s client port."""
    url = f"http://{member.endpoint}{path}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=2) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster for this test (members get killed, so it is never shared)."""
    for attempt in range(3):
        # A free port is free when picked, not when etcd binds it: another process may take it in between.
        cluster = EtcdCluster(tmp_path / f"cluster{attempt}")
        try:
            cluster.start()
            break
        except EmbeddedEtcdError:
            cluster.stop()
            if attempt == 2 or not _port_taken(tmp_path / f"cluster{attempt}"):
                raise
    try:
        yield cluster
    finally:
        cluster.stop()


def _port_taken(base: Path) -> bool:
    """True when a member of the cluster under `base` failed to start because its port was in use."""
    return any("address already in use" in log.read_text(errors="replace") for log in base.glob("*/etcd.log"))


async def wait_for_leader(cluster: EtcdCluster, *, timeout: float = 15.0) -> EmbeddedEtcd:
    """The leader, once the running members agree on one; fails the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(LookupError):
            return await asyncio.to_thread(cluster.leader)
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"the etcd cluster elected no leader within {timeout} s")
        await asyncio.sleep(0.05)
