"""The notify protocol over a real unix datagram socket: what is taken from the environment, what is sent,
and a watchdog that pings from the event loop, so that a blocked loop stops the pings."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from notify_listener import NotifyListener

from reconciler.systemd import Notifier


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A socket path must fit in 108 bytes; pytest's tmp_path for a long test name does not.
    with tempfile.TemporaryDirectory(prefix="sd-") as name:
        yield Path(name)


@pytest.fixture
def listener(short_dir: Path) -> Iterator[NotifyListener]:
    with NotifyListener(str(short_dir / "notify")) as listening:
        yield listening


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_environment_is_taken_and_removed_so_that_children_do_not_speak_for_the_daemon() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/usr/bin"}  # fmt: skip

    notifier = Notifier.from_environment(env)

    assert notifier == Notifier(address="/run/systemd/notify", watchdog_seconds=30.0)
    assert env == {"PATH": "/usr/bin"}


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("1000000", None, 1.0),  # no WATCHDOG_PID: the watchdog is for whoever reads it
        ("1000000", "own", 1.0),
        ("1000000", "1", None),  # meant for another process (a wrapper that exec'd us is the same pid)
        ("1000000", "x", None),
        (None, None, None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_the_watchdog_is_on_only_when_its_timeout_is_set_and_meant_for_this_process(
    usec: str | None, pid: str | None, expected: float | None
) -> None:
    env = {"NOTIFY_SOCKET": "/run/notify"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid()) if pid == "own" else pid

    assert Notifier.from_environment(env).watchdog_seconds == expected


def test_messages_arrive_on_a_socket_path_one_datagram_per_call_and_a_status_is_one_line(
    listener: NotifyListener,
) -> None:
    notifier = Notifier(address=listener.address)

    notifier.status("connecting to etcd\nat 127.0.0.1:2379")
    notifier.ready("ready: 3 resources, 4 workers")
    notifier.stopping("draining")

    deadline = time.monotonic() + 5
    while len(listener.snapshot()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [m.fields for m in listener.snapshot()] == [
        {"STATUS": "connecting to etcd at 127.0.0.1:2379"},
        {"READY": "1", "STATUS": "ready: 3 resources, 4 workers"},
        {"STOPPING": "1", "STATUS": "draining"},
    ]
    assert {m.pid for m in listener.snapshot()} == {os.getpid()}


def test_an_abstract_socket_name_is_understood() -> None:
    with NotifyListener(f"@setpoint-test-{uuid.uuid4().hex}") as listener:
        assert Notifier(address=listener.address).notify("READY=1")
        deadline = time.monotonic() + 5
        while not listener.snapshot() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert listener.snapshot()[0].fields == {"READY": "1"}


async def test_without_a_socket_nothing_is_sent_and_no_watchdog_task_is_made() -> None:
    before = asyncio.all_tasks()
    for notifier in (Notifier(), Notifier(watchdog_seconds=1.0), Notifier(address="/nowhere")):
        async with notifier.watchdog():
            if notifier.address is None:
                assert notifier.notify("READY=1") is False
            assert asyncio.all_tasks() == before


def test_a_socket_that_is_gone_is_a_false_not_an_error(short_dir: Path) -> None:
    assert Notifier(address=str(short_dir / "gone")).notify("READY=1") is False


def test_a_receiver_that_does_not_read_never_blocks_the_sender(short_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as deaf:
        deaf.bind(str(short_dir / "deaf"))
        notifier = Notifier(address=str(short_dir / "deaf"))
        began = time.monotonic()
        sent = [notifier.notify("WATCHDOG=1") for _ in range(5000)]
        assert time.monotonic() - began < 10
        assert sent[0] and not all(sent), "the receiver's queue should have filled up"


async def test_the_watchdog_pings_at_half_its_timeout_from_start_to_end(listener: NotifyListener) -> None:
    notifier = Notifier(address=listener.address, watchdog_seconds=0.2)

    async with notifier.watchdog():
        await wait_for(lambda: listener.pings())  # the first ping goes at once
        await asyncio.sleep(1.0)
    after = len(listener.pings())
    await asyncio.sleep(0.3)

    pings = listener.pings()
    assert len(pings) == after, "pings went on after the block ended"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 7 <= len(gaps) <= 12, gaps
    assert 0.08 <= sum(gaps) / len(gaps) <= 0.14, gaps


async def test_a_blocked_event_loop_stops_the_pings_and_they_resume_when_it_runs_again(
    listener: NotifyListener,
) -> None:
    notifier = Notifier(address=listener.address, watchdog_seconds=0.2)

    async with notifier.watchdog():
        await asyncio.sleep(0.5)
        blocked_at = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251 - a coroutine that blocks the loop: what the watchdog is there to catch
        unblocked_at = time.monotonic()
        await asyncio.sleep(0.5)

    pings = listener.pings()
    during = [t for t in pings if blocked_at + 0.05 < t < unblocked_at]
    assert during == [], "a ping was sent while the event loop was blocked"
    assert any(t < blocked_at for t in pings) and any(t > unblocked_at for t in pings), pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= 1.4, "systemd would have seen the silence and killed the daemon"
