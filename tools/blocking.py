"""Blocking work for tools, in a thread whose effect cannot land after its step gave up on it.

`asyncio.to_thread` cannot stop a thread: when the executor's timeout cancels
the await, the thread goes on, and a write it makes late can land over what a
newer plan wrote. So a tool runs blocking work through `run_blocking`, which
hands the work a `Commit`: everything before `with commit():` is preparation
(a temporary file, an fsync), and the effect itself (a rename, an unlink)
happens inside it. Once the await has been cancelled, `commit()` raises
`Abandoned`, and the work cleans up instead. A step that timed out therefore
either took effect before its timeout returned, or never will. If the
timeout comes while the effect is under way (a rename on a hung mount), the
call waits for it to end, in a thread, so the event loop goes on serving
everything else.

Tool work runs on its own pool of threads (`TOOL_THREADS` at most), so
threads stuck on a hung file system cannot starve the rest of the daemon's
blocking work (observing resources, checking paths) of threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

TOOL_THREADS = 16
_pool: ThreadPoolExecutor | None = None


def _tool_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # made on first use, never at import
        _pool = ThreadPoolExecutor(max_workers=TOOL_THREADS, thread_name_prefix="setpoint-tool")
    return _pool


class Abandoned(Exception):
    """The step this work belongs to gave up on it: make no change."""


class Commit:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Hold the right to take effect; raises Abandoned when the step has given up."""
        with self._lock:
            if self._abandoned:
                raise Abandoned()
            yield

    def try_abandon(self) -> bool:
        """Forbid any later effect; False, changing nothing, while an effect is under way."""
        if not self._lock.acquire(blocking=False):
            return False
        self._abandoned = True
        self._lock.release()
        return True

    def abandon(self) -> None:
        """Forbid any later effect, waiting for one under way to end (blocks: call it in a thread)."""
        with self._lock:
            self._abandoned = True


async def run_blocking(work: Callable[[Commit], T]) -> T:
    """Run `work(commit)` in a tool thread; once the caller is cancelled, no later `commit()` succeeds."""
    commit = Commit()
    try:
        return await asyncio.get_running_loop().run_in_executor(_tool_pool(), work, commit)
    except asyncio.CancelledError:
        if not commit.try_abandon():
            # An effect is under way: it has to end before this call may, or it could land after
            # a newer one. Wait for it without holding up the event loop.
            await asyncio.to_thread(commit.abandon)
        raise
