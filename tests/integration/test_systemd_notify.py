"""`setpoint run` under the notify protocol, as systemd runs it: a real process, a real unix datagram socket.

The socket stands in for systemd's: it sees the STATUS= lines, READY=1, the
watchdog pings at half of $WATCHDOG_USEC and STOPPING=1 on SIGTERM, and, as
systemd does under `NotifyAccess=main`, which process sent each one.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from notify_listener import Message, NotifyListener
from test_daemon_process import Process


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    # A socket path must fit in 108 bytes; pytest's tmp_path for a long test name does not.
    with tempfile.TemporaryDirectory(prefix="sd-") as name, NotifyListener(f"{name}/notify") as listening:
        yield listening


async def first(listener: NotifyListener, field: str, p: Process, timeout: float = 30) -> Message:
    deadline = time.monotonic() + timeout
    while not (found := listener.with_field(field)):
        assert p.proc is not None
        if p.proc.returncode is not None or time.monotonic() > deadline:
            pytest.fail(f"no {field}=; the daemon said:\n" + "\n".join(p.lines[-20:]))
        await asyncio.sleep(0.05)
    return found[0]


async def test_status_ready_watchdog_and_stopping_reach_the_notify_socket_from_the_daemon_alone(
    tmp_path: Path, listener: NotifyListener
) -> None:
    # The embedded etcd on purpose: it would send a READY=1 of its own if it inherited $NOTIFY_SOCKET.
    config = {"http": {"listen": "127.0.0.1:0"}, "state_dir": str(tmp_path / "state")}
    p = Process(config, tmp_path, env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"})
    await p.start()
    try:
        ready = await first(listener, "READY", p)
        await asyncio.sleep(3.0)  # the pings of a daemon at rest
        assert p.proc is not None
        p.proc.terminate()
        stopping = await first(listener, "STOPPING", p)
        assert await p.wait() == 0
    finally:
        await p.reap()

    messages = listener.snapshot()
    assert {m.pid for m in messages} == {p.proc.pid}, "only the main process may notify (NotifyAccess=main)"
    assert len(listener.with_field("READY")) == 1
    assert ready.status == "ready: leading, 0 resources, 4 workers"
    statuses = [m.status for m in messages if m.status is not None and m.at < ready.at]
    assert statuses[0] == "starting"
    assert statuses[1].startswith(f"starting the embedded etcd in {tmp_path / 'state'}")
    assert statuses[2].startswith("connecting to etcd at 127.0.0.1:")
    assert statuses[-4:] == ["listing resources from etcd", "campaigning for leadership",
                             "resuming what the last run left unfinished", "observing 0 resources"]  # fmt: skip

    pings = listener.pings()
    assert pings[0] < ready.at, "the watchdog runs while the daemon starts"
    at_rest = [t for t in pings if ready.at < t < stopping.at]
    gaps = [b - a for a, b in itertools.pairwise(at_rest)]
    assert len(gaps) >= 4, pings
    assert 0.4 <= sum(gaps) / len(gaps) <= 0.7, f"WATCHDOG_USEC=1 s means a ping every 0.5 s: {gaps}"
    assert max(gaps) < 1.0, f"systemd would have killed it: {gaps}"

    assert stopping.status is not None and stopping.status.startswith("draining: "), stopping
    after = [m.status for m in messages if m.status is not None and m.at > stopping.at]
    assert after[-1] == "stopping the embedded etcd", after
