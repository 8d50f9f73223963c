"""Blocking work for tools, in a thread whose effect cannot land after its step gave up on it.

`asyncio.to_thread` cannot stop a thread: when the executor's timeout cancels
the await, the thread goes on, and a write it makes late can land over what a
newer plan wrote. So a tool runs blocking work through `run_blocking`, which
hands the work a `Commit`: everything before `with commit():` is preparation
(a temporary file, an fsync), and the effect itself (a rename, an unlink)
happens inside it. Once the await has been cancelled, `commit()` raises
`Abandoned`, and the work cleans up instead. A step that timed out therefore
either took effect before its timeout returned, or never will.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


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

    def abandon(self) -> None:
        # Waits for an effect already under way (one rename or unlink), so that
        # when the await ends, the effect has either happened or never will.
        with self._lock:
            self._abandoned = True


async def run_blocking(work: Callable[[Commit], T]) -> T:
    """Run `work(commit)` in a thread; if the caller is cancelled, no later `commit()` succeeds."""
    commit = Commit()
    try:
        return await asyncio.to_thread(work, commit)
    except asyncio.CancelledError:
        commit.abandon()
        raise
