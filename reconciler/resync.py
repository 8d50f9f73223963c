"""The periodic resync: every key is queued again, so drift that raised no event is still found.

Level-triggered, as client-go's resync, but not in one burst: a pass queues
the keys a slice at a time, the next slice only once the workers have taken
the queue below one slice. A change that arrives during a pass therefore
waits behind at most one slice of resync keys, never behind the whole key
space, while the pass still goes as fast as the workers take keys (a key
already queued is not queued twice). The period is jittered by ±10% so that
daemons sharing one etcd do not resync in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

from plans import ResourceKey
from reconciler.clock import Clock, SystemClock

log = structlog.get_logger("setpoint.resync")

SLICE = 64  # resync keys queued at a time


class Drains(Protocol):
    """What a pass needs of the work queue: to wait until the workers have taken it below a depth."""

    async def wait_below(self, depth: int) -> None: ...


class Resync:
    def __init__(
        self,
        *,
        keys: Callable[[], Iterable[ResourceKey]],
        enqueue: Callable[[ResourceKey], None],
        queue: Drains,
        period: float,
        slice_size: int = SLICE,
        clock: Clock | None = None,
        on_pass: Callable[[int], None] = lambda keys: None,
    ) -> None:
        """`keys()`: every key to look at again; `enqueue`: how one is queued; `on_pass(keys)` after each pass.
        `slice_size` defaults to 64, `clock` to the system clock."""
        self._keys = keys
        self._enqueue = enqueue
        self._queue = queue
        self._period = period
        self._slice = max(1, slice_size)
        self._clock: Clock = clock or SystemClock()
        self._on_pass = on_pass

    async def run(self) -> None:
        """A pass every period (jittered); returns only by cancellation."""
        while True:
            await self._clock.sleep(self._period * random.uniform(0.9, 1.1))
            self._on_pass(await self.pass_once())

    async def pass_once(self) -> int:
        """Queue every key, a slice at a time; the number of keys."""
        keys = list(self._keys())
        began = time.monotonic()
        log.info("resync.began", keys=len(keys))
        for start in range(0, len(keys), self._slice):
            await self._queue.wait_below(self._slice)
            for key in keys[start : start + self._slice]:
                self._enqueue(key)
        # The last slice is queued: its reconciles are still to come.
        log.info("resync", keys=len(keys), queued_in=round(time.monotonic() - began, 3))
        return len(keys)
