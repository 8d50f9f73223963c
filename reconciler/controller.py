"""The worker loop, and the one place that decides what happens to a key after its reconcile.

Workers take keys from the work queue, no faster than the global rate limit,
and hand each to `reconcile` (`reconcile.py`). `_process` is the outcome
switch, the boundary where whatever a reconcile did becomes the key's next
step in the queue:

- an `Outcome` with `requeue_after`: forget the key's backoff, add it again later;
- any other `Outcome`: forget the key's backoff;
- a `TemporaryError`: add it again after its own delay, or its next backoff;
- a `PermanentError`: drop it until its inputs change;
- a `LeadershipLostError` (a write refused: this daemon no longer leads):
  drop it, since the next leader reconciles every key; counted `interrupted`;
- any other exception: a bug; logged with its traceback, retried with backoff.

Every branch logs once and counts `setpoint_reconcile_total{kind, result}`.

The workers are supervised: `run` ends with `WorkerDiedError` if one of them
dies (only a bug in this loop can do that), so the daemon stops instead of
standing ready with nobody working; the other workers go on with the key in
hand. `shutdown` stops taking keys and lets the reconciles under way finish,
up to a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiolimiter import AsyncLimiter

from plans import PermanentError, ResourceKey, TemporaryError
from reconciler.metrics import Metrics
from reconciler.outcome import Outcome, Result
from reconciler.store import LeadershipLostError
from reconciler.workqueue import ShutDownError, WorkQueue

log = structlog.get_logger("setpoint.controller")

Reconcile = Callable[[ResourceKey], Awaitable[Outcome]]


class WorkerDiedError(RuntimeError):
    """A worker ended with an exception the outcome switch did not catch."""


def rate_limiter(per_second: float) -> AsyncLimiter:
    """At most `per_second` acquisitions a second, for any rate above 0 (fractions included)."""
    if per_second >= 1:
        return AsyncLimiter(max_rate=per_second, time_period=1.0)
    return AsyncLimiter(max_rate=1, time_period=1.0 / per_second)  # one every 1/rate seconds


class Controller:
    def __init__(
        self,
        *,
        queue: WorkQueue[ResourceKey],
        reconcile: Reconcile,
        metrics: Metrics,
        workers: int,
        rate_limit_per_second: float,
    ) -> None:
        self._queue = queue
        self._reconcile = reconcile
        self._metrics = metrics
        self._count = workers
        self._rate = rate_limiter(rate_limit_per_second)
        self._workers: list[asyncio.Task[None]] = []
        self._counted: dict[tuple[str, Result], tuple[Any, Any]] = {}  # the metrics' children, by kind and result

    async def run(self) -> None:
        """Run the workers until `shutdown`; raises WorkerDiedError if one of them dies.

        The others keep working then, so that `shutdown` can drain them; they are
        cancelled only if `run` itself is.
        """
        self._workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self._count)]
        try:
            done, _ = await asyncio.wait(self._workers, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            raise
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise WorkerDiedError(f"{task.get_name()} died: {task.exception()!r}") from task.exception()

    async def shutdown(self, timeout: float) -> bool:
        """Stop taking keys and let running reconciles finish; True if all drained within `timeout`."""
        await self._queue.shutdown()
        if not self._workers:
            return True
        _, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return not pending

    async def _worker(self) -> None:
        while True:
            try:
                key = await self._queue.get()
            except ShutDownError:
                return
            try:
                await self._process(key)
            finally:
                self._queue.done(key)

    async def _process(self, key: ResourceKey) -> None:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(key=str(key), revision=None):
            try:
                await self._rate.acquire()
                outcome = await self._reconcile(key)
            except TemporaryError as e:
                if e.delay is not None:
                    delay = e.delay
                    self._queue.add_after(key, delay)
                else:
                    delay = self._queue.add_rate_limited(key)
                log.warning("reconcile.retry", error=str(e)[:500], retry_in=round(delay, 3))
                outcome = Outcome(Result.RETRY)
            except PermanentError as e:
                self._queue.forget(key)
                log.warning("reconcile.terminal", error=str(e)[:500])
                outcome = Outcome(Result.TERMINAL)
            except LeadershipLostError as e:  # nothing more is written or started; the runtime is on its way out
                self._queue.forget(key)
                log.info("reconcile.not_leader", error=str(e)[:500])
                outcome = Outcome(Result.INTERRUPTED)
            except Exception as e:
                delay = self._queue.add_rate_limited(key)
                log.exception("reconcile.error", error=str(e)[:500], retry_in=round(delay, 3))
                outcome = Outcome(Result.ERROR)
            else:
                self._queue.forget(key)
                if outcome.requeue_after is not None:
                    self._queue.add_after(key, outcome.requeue_after)
                log.info("reconcile.done", result=outcome.result.value)
        counted = self._counted.get((key.kind, outcome.result))
        if counted is None:  # `labels()` takes a lock and builds its key at every call: once per pair is enough
            counted = self._counted[(key.kind, outcome.result)] = (
                self._metrics.reconciles.labels(kind=key.kind, result=outcome.result.value),
                self._metrics.reconcile_duration.labels(kind=key.kind),
            )
        counted[0].inc()
        counted[1].observe(time.monotonic() - started)
