"""The controller's workers: supervised, rate limited at any rate, and one outcome per reconcile."""

from __future__ import annotations

import asyncio

import pytest

from plans import PermanentError, ResourceKey, TemporaryError
from reconciler.controller import Controller, WorkerDiedError, rate_limiter
from reconciler.metrics import Metrics
from reconciler.outcome import Outcome, Result
from reconciler.workqueue import ExponentialBackoff, WorkQueue

KEY = ResourceKey(kind="file", name="a")


class Escape(BaseException):
    """Something no `except Exception` catches: it gets past the outcome switch."""


def controller(reconcile, queue: WorkQueue[ResourceKey], **kwargs: float) -> Controller:  # type: ignore[no-untyped-def]
    return Controller(
        queue=queue, reconcile=reconcile, metrics=Metrics(), workers=2,
        rate_limit_per_second=kwargs.get("rate", 1000.0),
    )  # fmt: skip


async def test_a_dead_worker_ends_run_so_the_daemon_notices() -> None:
    async def reconcile(key: ResourceKey) -> Outcome:
        raise Escape()

    queue: WorkQueue[ResourceKey] = WorkQueue()
    c = controller(reconcile, queue)
    queue.add(KEY)

    with pytest.raises(WorkerDiedError, match="Escape"):
        await asyncio.wait_for(c.run(), 5)


async def test_a_rate_below_one_per_second_lets_reconciles_through() -> None:
    done: list[ResourceKey] = []

    async def reconcile(key: ResourceKey) -> Outcome:
        done.append(key)
        return Outcome(Result.CONVERGED)

    queue: WorkQueue[ResourceKey] = WorkQueue()
    c = controller(reconcile, queue, rate=0.5)
    run = asyncio.create_task(c.run())
    queue.add(KEY)
    while not done:
        await asyncio.sleep(0.01)
        assert not run.done(), run
    assert await c.shutdown(5)
    await run
    assert done == [KEY]


def test_the_rate_limiter_takes_any_positive_rate() -> None:
    assert rate_limiter(50).max_rate == 50 and rate_limiter(50).time_period == 1.0
    slow = rate_limiter(0.25)
    assert (slow.max_rate, slow.time_period) == (1, 4.0)


@pytest.mark.parametrize(
    ("raised", "result", "requeued"),
    [
        (TemporaryError("etcd is down"), Result.RETRY, True),
        (PermanentError("cannot ever work"), Result.TERMINAL, False),
        (RuntimeError("a bug"), Result.ERROR, True),
    ],
)
async def test_every_way_a_reconcile_ends_is_counted_once_and_requeued_as_it_should(
    raised: Exception, result: Result, requeued: bool
) -> None:
    called = asyncio.Event()

    async def reconcile(key: ResourceKey) -> Outcome:
        called.set()
        raise raised

    queue: WorkQueue[ResourceKey] = WorkQueue(backoff=ExponentialBackoff(base=30, cap=60))
    c = controller(reconcile, queue)
    run = asyncio.create_task(c.run())
    queue.add(KEY)
    metrics = c._metrics
    sample = {"kind": "file", "result": result.value}
    await asyncio.wait_for(called.wait(), 5)  # the switch runs to its end before the worker awaits again
    waiting = queue.waiting  # a requeued key waits out its (30 s) backoff
    assert await c.shutdown(5)
    await run
    assert metrics.registry.get_sample_value("setpoint_reconcile_total", sample) == 1
    assert waiting == (1 if requeued else 0)


async def test_a_dead_worker_leaves_the_others_to_finish_their_reconcile() -> None:
    """The daemon drains after a worker died; that drain must find the others still at work."""
    other, release, finished = ResourceKey(kind="file", name="b"), asyncio.Event(), asyncio.Event()

    async def reconcile(key: ResourceKey) -> Outcome:
        if key == KEY:
            await asyncio.sleep(0.05)  # the other worker is mid-reconcile by now
            raise Escape()
        await release.wait()  # a step in progress
        finished.set()
        return Outcome(Result.CONVERGED)

    queue: WorkQueue[ResourceKey] = WorkQueue()
    c = controller(reconcile, queue)
    queue.add(other)
    queue.add(KEY)

    with pytest.raises(WorkerDiedError):
        await asyncio.wait_for(c.run(), 5)
    release.set()

    assert await c.shutdown(5), "the other worker was cancelled instead of drained"
    assert finished.is_set()
