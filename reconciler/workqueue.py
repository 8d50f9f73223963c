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

What the queue does is reported to a `QueueObserver` (the daemon's metrics),
so the queue itself stays free of any metrics library: every `add` (whether
or not the key was queued already; a delayed add when its delay ends), every
`add_rate_limited`, and, when a worker takes a key, how long it waited since
it could first be taken. A key added while it is being processed can be
taken only after `done`, so its wait starts then; a delayed key's starts
when its delay ends. `longest_running` says how long the oldest key still
being processed has been.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

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


class QueueObserver(Protocol):
    """Told what the queue does, as it does it (synchronously, so it must not block)."""

    def added(self) -> None: ...

    def retried(self) -> None: ...

    def taken(self, waited: float) -> None:
        """A worker took a key that could have been taken `waited` seconds earlier."""
        ...


class _Unobserved:
    def added(self) -> None:
        pass

    def retried(self) -> None:
        pass

    def taken(self, waited: float) -> None:
        pass


class WorkQueue(Generic[K]):
    def __init__(
        self,
        *,
        clock: Clock | None = None,
        backoff: ExponentialBackoff[K] | None = None,
        observer: QueueObserver | None = None,
    ) -> None:
        """`clock` defaults to the system clock, `backoff` to `ExponentialBackoff()`; `observer` to none."""
        self._clock = clock or SystemClock()
        self.backoff = backoff or ExponentialBackoff()
        self._observer: QueueObserver = observer or _Unobserved()
        self._queue: deque[K] = deque()
        self._ready_since: dict[K, float] = {}  # for each queued key, since when it could be taken
        self._dirty: set[K] = set()
        self._processing: dict[K, float] = {}  # each key being processed, and when it was taken
        self._getters: deque[asyncio.Future[None]] = deque()
        self._drain_waiters: list[tuple[int, asyncio.Future[None]]] = []  # see `wait_below`
        self._waiting: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()
        self._heap_changed = asyncio.Event()
        self._shutting_down = False
        self._delay_task: asyncio.Task[None] | None = None

    # -- adding -----------------------------------------------------------------

    def add(self, key: K) -> None:
        self._add(key, ready_since=None)

    def _add(self, key: K, *, ready_since: float | None) -> None:
        if self._shutting_down:
            return
        self._observer.added()
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return
        self._enqueue(key, self._clock.now() if ready_since is None else ready_since)

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
        if not self._shutting_down:
            self._observer.retried()
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
        if self._drain_waiters:
            self._wake_drained()
        now = self._clock.now()
        self._processing[key] = now
        self._dirty.discard(key)
        self._observer.taken(max(0.0, now - self._ready_since.pop(key, now)))
        return key

    def done(self, key: K) -> None:
        self._processing.pop(key, None)
        if key in self._dirty and not self._shutting_down:
            self._enqueue(key, self._clock.now())

    async def wait_below(self, depth: int) -> None:
        """Return once fewer than `depth` keys can be taken (at once if that is so already, or the queue is
        shut down): for a producer of many keys that must not bury the keys others add (the resync)."""
        while len(self._queue) >= depth and not self._shutting_down:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (depth, waiter)
            self._drain_waiters.append(entry)
            try:
                await waiter
            finally:
                if entry in self._drain_waiters:
                    self._drain_waiters.remove(entry)

    # -- state ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    def longest_running(self) -> float:
        """Seconds since the longest-processed key still in hand was taken; 0 when none is."""
        now = self._clock.now()
        return max((now - taken for taken in self._processing.values()), default=0.0)

    async def shutdown(self) -> None:
        """Stop accepting keys and wake every waiting `get`; queued keys are dropped."""
        self._shutting_down = True
        self._queue.clear()
        self._ready_since.clear()
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
        self._wake_drained()

    # -- internals --------------------------------------------------------------

    def _enqueue(self, key: K, ready_since: float) -> None:
        self._queue.append(key)
        self._ready_since[key] = ready_since
        self._notify()

    def _wake_drained(self) -> None:
        depth = len(self._queue)
        waiting = []
        for depth_wanted, waiter in self._drain_waiters:
            if depth < depth_wanted or self._shutting_down:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((depth_wanted, waiter))
        self._drain_waiters = waiting

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
                self._add(key, ready_since=ready_at)  # its wait began when its delay ended
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
