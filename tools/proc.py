"""What `/proc` says about a process, and the log files of supervised processes.

A pid alone does not name a process: once it exits, the kernel hands the
same number to the next one. So a process is named by its pid, its start
time (`/proc/<pid>/stat` field 22, in clock ticks since boot) and the boot it
started in (`/proc/sys/kernel/random/boot_id`); `identity` reads those, and a
process whose start time or boot differs is someone else's. A zombie has
exited: it is not running, even though its pid is still taken.

Log files are rotated by size with copy-and-truncate: the process keeps
writing to its file (opened `O_APPEND`, so after the truncation it writes at
the new end), the content is copied to `<log>.1` (older copies shift to
`.2` .. `.N`) and the file is truncated. What the process writes between the
copy and the truncation is lost: a few milliseconds of output at most, the
price of never having to signal the process to reopen its file.

Everything here blocks (it reads files): call it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TAIL_READ_BYTES = 64 * 1024  # what is read from a log's end to find its last lines
MAX_LINE_CHARS = 500  # a line longer than this is cut when shown


@dataclass(frozen=True, slots=True)
class Identity:
    """Who holds a pid: its start time since boot (clock ticks), whether it is a zombie, its session."""

    start_time: int
    zombie: bool
    session: int


@cache
def boot_id() -> str:
    """This boot's id; a start time from another boot says nothing about this one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def identity(pid: int) -> Identity | None:
    """What `/proc/<pid>/stat` says of the process holding `pid` now; None when no process holds it."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself hold ") ": split after the last one.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        # fields[0] is field 3 (state); field 6 is the session, field 22 the start time.
        return Identity(start_time=int(fields[19]), zombie=fields[0] in (b"Z", b"X"), session=int(fields[3]))
    except (IndexError, ValueError):
        return None


def is_running(pid: int, start_time: int, boot: str) -> bool:
    """Whether the process that started at `start_time` in boot `boot` with `pid` runs now (not a zombie)."""
    if boot != boot_id():
        return False
    found = identity(pid)
    return found is not None and found.start_time == start_time and not found.zombie


def cmdline(pid: int) -> list[str] | None:
    """The argv of `pid`, or None when it is gone (or a kernel thread, or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0")]


def tail(path: Path, lines: int, *, max_bytes: int = TAIL_READ_BYTES) -> list[str]:
    """The last `lines` lines of `path` (from at most its last `max_bytes` bytes; long lines cut); [] if none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return []
    text = data.decode("utf-8", "replace")
    found = text.splitlines()
    if size > max_bytes and found:
        found = found[1:]  # the first line read is probably cut at its start
    return [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + "…" for line in found[-lines:]]


def rotate(path: Path, *, max_bytes: int, backups: int) -> bool:
    """Copy-and-truncate `path` when it is larger than `max_bytes`, keeping `backups` copies; True if rotated.

    With no backups the file is only truncated."""
    try:
        if os.stat(path).st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{backups}")
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        shutil.copyfile(path, f"{path}.1")
    os.truncate(path, 0)
    return True
