"""The systemd notify protocol (sd_notify(3), sd_watchdog_enabled(3)): the one place that speaks it.

Under a `Type=notify` unit systemd hands the daemon a datagram socket in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading @) and,
with `WatchdogSec=`, the timeout in $WATCHDOG_USEC and the process it is meant
for in $WATCHDOG_PID. The daemon sends datagrams of newline-separated
assignments:

- `STATUS=...`: what it is doing, one line, shown by `systemctl status`;
- `READY=1` once it serves, `STOPPING=1` when it starts to drain;
- `WATCHDOG=1` every half timeout, from start to stop. The pings come from a
  task on the event loop, never from a thread: a thread would go on pinging
  while the loop is stuck, and a stuck loop is what the watchdog is for. When
  the pings stop, systemd kills the daemon and `Restart=` starts it again.

`Notifier.from_environment` takes these variables once and removes them from
the environment, as sd_notify's `unset_environment` does, so that children do
not speak for the daemon: the embedded etcd sends a READY=1 of its own when
it finds $NOTIFY_SOCKET (systemd drops it under `NotifyAccess=main`, with a
warning in the journal each time), and so might a supervised process.

A send never blocks the event loop: the socket is non-blocking, and a datagram
that cannot go at once (systemd not reading) is dropped and logged. Without
$NOTIFY_SOCKET every call does nothing, and there is no watchdog task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger("setpoint.systemd")


@dataclass(frozen=True, slots=True)
class Notifier:
    """Where to send; `Notifier()` (no socket) sends nothing, as outside systemd."""

    address: str | None = None  # $NOTIFY_SOCKET as given; None: not run by systemd as Type=notify
    watchdog_seconds: float | None = None  # WatchdogSec=; None: no watchdog, or it watches another process

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take the protocol's variables out of `environ` (defaults to the process environment)."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "") or None
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        return cls(address=address, watchdog_seconds=_watchdog_seconds(usec, pid))

    def notify(self, *assignments: str) -> bool:
        """Send `assignments` (e.g. "READY=1") in one datagram; False when there is no socket or it failed."""
        if self.address is None:
            return False
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(assignments).encode(), address)
        except OSError as e:
            log.warning("systemd.notify_failed", socket=self.address, sent=list(assignments), error=str(e))
            return False
        return True

    def status(self, text: str) -> None:
        """What the daemon is doing, for `systemctl status`."""
        self.notify(_status(text))

    def ready(self, status: str) -> None:
        self.notify("READY=1", _status(status))

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", _status(status))

    @contextlib.asynccontextmanager
    async def watchdog(self) -> AsyncIterator[None]:
        """Ping the watchdog from the running event loop for as long as the block runs (nothing without one)."""
        if self.address is None or self.watchdog_seconds is None:
            yield
            return
        interval = self.watchdog_seconds / 2
        log.info("systemd.watchdog", timeout_seconds=self.watchdog_seconds, ping_every_seconds=interval)
        task = asyncio.create_task(self._ping(interval), name="watchdog")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _status(text: str) -> str:
    # A newline would end the assignment and start another.
    return "STATUS=" + " ".join(text.split())


def _watchdog_seconds(usec: str, pid: str) -> float | None:
    """The watchdog timeout in seconds if it is set and meant for this process, as sd_watchdog_enabled(3)."""
    if not usec:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("systemd.watchdog_ignored", WATCHDOG_USEC=usec[:40], reason="not a positive number")
        return None
    return int(usec) / 1_000_000
