"""A stand-in for systemd's end of the notify protocol: a real AF_UNIX datagram socket.

It records every datagram with the time it arrived and the pid of the process
that sent it (SO_PASSCRED, as systemd does to enforce `NotifyAccess=main`).
A thread reads, so the recording goes on while the event loop under test is
blocked.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() on arrival
    pid: int  # the sender
    fields: dict[str, str]  # one datagram: newline-separated KEY=VALUE assignments

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")


class NotifyListener:
    def __init__(self, address: str) -> None:
        """`address`: a path, or an abstract name written with a leading @ (as in $NOTIFY_SOCKET)."""
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.05)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)

    def __enter__(self) -> NotifyListener:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            at = time.monotonic()
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            with self._lock:
                self.messages.append(Message(at=at, pid=pid, fields=fields))

    def snapshot(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def with_field(self, name: str) -> list[Message]:
        return [m for m in self.snapshot() if name in m.fields]

    def pings(self) -> list[float]:
        """When each WATCHDOG=1 arrived."""
        return [m.at for m in self.snapshot() if m.fields.get("WATCHDOG") == "1"]
