"""WorkQueue with client-go semantics, driven by a FakeClock so every timing assertion is exact.

`settle()` lets the event loop run the queue's delay loop and any woken `get`
without moving the clock; a `get` that is still pending after it is blocked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from reconciler.clock import FakeClock
from reconciler.workqueue import ExponentialBackoff, ShutDownError, WorkQueue


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def queue(clock: FakeClock) -> AsyncIterator[WorkQueue[str]]:
    q: WorkQueue[str] = WorkQueue(clock=clock, backoff=ExponentialBackoff(base=0.5, cap=8.0))
    yield q
    await q.shutdown()


async def blocked_get(queue: WorkQueue[str]) -> asyncio.Task[str]:
    task = asyncio.create_task(queue.get())
    await settle()
    assert not task.done(), "get returned while it should block"
    return task


async def assert_empty(queue: WorkQueue[str]) -> None:
    assert len(queue) == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), timeout=0.01)


# -- coalescing and ownership ----------------------------------------------------


async def test_adding_a_key_many_times_queues_it_once(queue: WorkQueue[str]) -> None:
    for _ in range(100):
        queue.add("file/motd")
    assert len(queue) == 1
    assert await queue.get() == "file/motd"
    await assert_empty(queue)


async def test_keys_come_out_in_the_order_they_were_first_added(queue: WorkQueue[str]) -> None:
    for key in ["a", "b", "a", "c", "b"]:
        queue.add(key)
    assert [await queue.get() for _ in range(3)] == ["a", "b", "c"]


async def test_distinct_keys_are_processed_concurrently(queue: WorkQueue[str]) -> None:
    queue.add("a")
    queue.add("b")
    first, second = await asyncio.gather(queue.get(), queue.get())
    assert {first, second} == {"a", "b"}
    assert queue.processing == frozenset({"a", "b"})


async def test_a_key_being_processed_is_not_handed_to_a_second_worker(queue: WorkQueue[str]) -> None:
    queue.add("k")
    assert await queue.get() == "k"
    queue.add("k")
    queue.add("k")
    assert len(queue) == 0
    second = await blocked_get(queue)

    queue.done("k")
    await settle()
    assert second.done() and second.result() == "k"
    assert queue.processing == frozenset({"k"})
    await assert_empty(queue)


async def test_a_key_added_while_processing_runs_again_exactly_once_after_done(queue: WorkQueue[str]) -> None:
    queue.add("k")
    await queue.get()
    queue.add("k")
    queue.done("k")
    assert len(queue) == 1
    assert await queue.get() == "k"
    queue.done("k")
    assert queue.processing == frozenset()
    await assert_empty(queue)


async def test_done_without_a_new_add_does_not_requeue(queue: WorkQueue[str]) -> None:
    queue.add("k")
    await queue.get()
    queue.done("k")
    assert queue.processing == frozenset()
    await assert_empty(queue)


async def test_a_blocked_get_wakes_when_a_key_is_added(queue: WorkQueue[str]) -> None:
    waiter = await blocked_get(queue)
    queue.add("k")
    await settle()
    assert waiter.result() == "k"


async def test_a_cancelled_get_does_not_swallow_a_key(queue: WorkQueue[str]) -> None:
    cancelled = await blocked_get(queue)
    survivor = await blocked_get(queue)
    queue.add("k")
    cancelled.cancel()
    await settle()
    assert cancelled.cancelled()
    assert survivor.result() == "k"


# -- delayed adds ------------------------------------------------------------------


async def test_add_after_fires_only_once_the_clock_reaches_the_delay(queue: WorkQueue[str], clock: FakeClock) -> None:
    queue.add_after("k", 2.0)
    await settle()
    assert (len(queue), queue.waiting) == (0, 1)
    clock.advance(1.5)
    await settle()
    assert len(queue) == 0
    clock.advance(0.5)
    await settle()
    assert (len(queue), queue.waiting) == (1, 0)
    assert await queue.get() == "k"


async def test_add_after_without_a_delay_adds_at_once(queue: WorkQueue[str]) -> None:
    queue.add_after("now", 0)
    queue.add_after("before", -1)
    assert len(queue) == 2


@pytest.mark.parametrize("delays", [(5.0, 2.0), (2.0, 5.0)], ids=["earlier-second", "earlier-first"])
async def test_the_earlier_add_after_wins_and_fires_once(
    queue: WorkQueue[str], clock: FakeClock, delays: tuple[float, float]
) -> None:
    for delay in delays:
        queue.add_after("k", delay)
    await settle()
    clock.advance(1.0)
    await settle()
    assert len(queue) == 0
    clock.advance(1.0)
    await settle()
    assert await queue.get() == "k"
    queue.done("k")
    clock.advance(10.0)
    await settle()
    assert (len(queue), queue.waiting) == (0, 0)


async def test_delayed_keys_fire_in_deadline_order(queue: WorkQueue[str], clock: FakeClock) -> None:
    queue.add_after("late", 3.0)
    queue.add_after("early", 1.0)
    queue.add_after("middle", 2.0)
    await settle()
    clock.advance(3.0)
    await settle()
    assert [await queue.get() for _ in range(3)] == ["early", "middle", "late"]


async def test_an_add_after_made_while_the_loop_sleeps_on_a_later_key_is_not_held_back(
    queue: WorkQueue[str], clock: FakeClock
) -> None:
    queue.add_after("late", 10.0)
    await settle()
    queue.add_after("soon", 1.0)
    await settle()
    clock.advance(1.0)
    await settle()
    assert await queue.get() == "soon"
    assert queue.waiting == 1


async def test_add_after_fires_on_time_when_the_clock_moves_right_after_the_loop_goes_to_sleep(
    queue: WorkQueue[str], clock: FakeClock
) -> None:
    queue.add_after("k", 1.0)
    await asyncio.sleep(0)  # the delay loop runs once and schedules its sleep; the sleep has not started
    clock.advance(1.0)
    await settle()
    assert len(queue) == 1


# -- rate limiting -------------------------------------------------------------------


async def test_rate_limited_delays_double_and_cap(queue: WorkQueue[str]) -> None:
    delays = [queue.add_rate_limited("k") for _ in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert queue.backoff.failures("k") == 7


async def test_rate_limiting_is_per_key_and_forget_resets_it(queue: WorkQueue[str]) -> None:
    for _ in range(3):
        queue.add_rate_limited("a")
    assert queue.add_rate_limited("b") == 0.5
    queue.forget("a")
    assert queue.backoff.failures("a") == 0
    assert queue.add_rate_limited("a") == 0.5
    assert queue.add_rate_limited("b") == 1.0


async def test_a_rate_limited_key_comes_back_after_exactly_its_delay(queue: WorkQueue[str], clock: FakeClock) -> None:
    queue.add_rate_limited("k")
    queue.add_rate_limited("k")  # the pending 0.5 s wake-up is earlier, so it stands
    await settle()
    clock.advance(0.25)
    await settle()
    assert len(queue) == 0
    clock.advance(0.25)
    await settle()
    assert await queue.get() == "k"


def test_default_backoff_is_half_a_second_capped_at_five_minutes() -> None:
    backoff: ExponentialBackoff[str] = ExponentialBackoff()
    delays = [backoff.next_delay("k") for _ in range(12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == 300.0
    assert max(delays) == 300.0
    for _ in range(100):
        assert backoff.next_delay("k") == 300.0


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_needs_a_positive_base_not_above_the_cap(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(base=base, cap=cap)


# -- shutdown ------------------------------------------------------------------------


async def test_shutdown_wakes_a_blocked_get_with_shut_down_error(queue: WorkQueue[str]) -> None:
    waiters = [await blocked_get(queue), await blocked_get(queue)]
    await queue.shutdown()
    for waiter in waiters:
        with pytest.raises(ShutDownError):
            await waiter


async def test_after_shutdown_adds_are_ignored_and_get_fails(queue: WorkQueue[str], clock: FakeClock) -> None:
    queue.add("queued")
    queue.add_after("delayed", 1.0)
    await settle()
    await queue.shutdown()
    queue.add("late")
    queue.add_after("later", 1.0)
    clock.advance(5.0)
    await settle()
    assert (len(queue), queue.waiting) == (0, 0)
    with pytest.raises(ShutDownError):
        await queue.get()


async def test_wait_below_returns_once_workers_took_the_queue_below_the_depth(queue: WorkQueue[str]) -> None:
    for key in "abcd":
        queue.add(key)
    waiting = asyncio.create_task(queue.wait_below(3))
    await settle()
    assert not waiting.done()
    await queue.get()  # 3 left: not below 3
    await settle()
    assert not waiting.done()
    await queue.get()
    await settle()
    assert waiting.done()
    await queue.wait_below(3)  # at once when it is so already
