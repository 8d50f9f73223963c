"""A work queue with client-go semantics.

- A key is queued at most once, however many times it is added (coalescing):
  the worker re-reads the cache, so it never needs the individual events.
- A key is never handed to two workers at once: while a key is being
  processed, adds only mark it dirty.
- A key added while it was being processed is queued again when the worker
  calls `done`, so the change it signalled is not lost.
- `add_rate_limited` delays a key by its own exponential backoff
  (`base * 2**failures`, capped); `forget` resets it after a success.
- `add_after` delays an add; if a key is already waiting, the earlier time wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from reconciler.clock import Clock, SystemClock

K = TypeVar("K", bound=Hashable)


class ExponentialBackoff(Generic[K]):
    """Per-key delay `base * 2**failures`, capped at `cap`. Defaults: 0.5 s base, 300 s cap."""

    def __init__(self, *, base: float = 0.5, cap: float = 300.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._failures: dict[K, int] = {}

    def next_delay(self, key: K) -> float:
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        if failures >= 64:
            return self.cap
        return min(self.cap, self.base * float(1 << failures))

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)


class ShutDownError(Exception):
    pass


class WorkQueue(Generic[K]):
    def __init__(self, *, clock: Clock | None = None, backoff: ExponentialBackoff[K] | None = None) -> None:
        self._clock = clock or SystemClock()
        self.backoff = backoff or ExponentialBackoff()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._waiting: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._heap_changed = asyncio.Event()
        self._shutting_down = False
        self._delay_task: asyncio.Task[None] | None = None

    # -- adding -----------------------------------------------------------------

    def add(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return
        self._queue.append(key)
        self._notify()

    def add_after(self, key: K, delay: float) -> None:
        if self._shutting_down:
            return
        if delay <= 0:
            self.add(key)
            return
        ready_at = self._clock.now() + delay
        current = self._waiting.get(key)
        if current is not None and current <= ready_at:
            return
        self._waiting[key] = ready_at
        heapq.heappush(self._heap, (ready_at, next(self._seq), key))
        self._heap_changed.set()
        self._ensure_delay_loop()

    def add_rate_limited(self, key: K) -> float:
        """Re-add `key` after its next backoff delay; returns the delay."""
        delay = self.backoff.next_delay(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        self.backoff.forget(key)

    # -- taking -----------------------------------------------------------------

    async def get(self) -> K:
        """The next key; raises ShutDownError once the queue is shut down and empty."""
        while not self._queue:
            if self._shutting_down:
                raise ShutDownError()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # Pass a wake-up we were given but cannot use on to the next getter.
                if waiter.done() and not waiter.cancelled():
                    self._notify()
                raise
        key = self._queue.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty and not self._shutting_down:
            self._queue.append(key)
            self._notify()

    # -- state ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    async def shutdown(self) -> None:
        """Stop accepting keys and wake every waiting `get`; queued keys are dropped."""
        self._shutting_down = True
        self._queue.clear()
        self._dirty.clear()
        self._waiting.clear()
        self._heap.clear()
        if self._delay_task is not None:
            self._delay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delay_task
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- internals --------------------------------------------------------------

    def _notify(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _ensure_delay_loop(self) -> None:
        if self._delay_task is None or self._delay_task.done():
            self._delay_task = asyncio.get_running_loop().create_task(self._delay_loop())

    async def _delay_loop(self) -> None:
        while not self._shutting_down:
            while self._heap:
                ready_at, _, key = self._heap[0]
                if self._waiting.get(key) != ready_at:
                    heapq.heappop(self._heap)  # superseded by an earlier add_after
                    continue
                if ready_at > self._clock.now():
                    break
                heapq.heappop(self._heap)
                del self._waiting[key]
                self.add(key)
            self._heap_changed.clear()
            if not self._heap:
                await self._heap_changed.wait()
                continue
            # An absolute deadline: the sleeper task may start after the clock moved.
            sleeper = asyncio.ensure_future(self._clock.sleep_until(self._heap[0][0]))
            changed = asyncio.ensure_future(self._heap_changed.wait())
            try:
                await asyncio.wait({sleeper, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                changed.cancel()
