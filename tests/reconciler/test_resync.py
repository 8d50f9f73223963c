"""The resync scheduler on a real work queue: every key is queued, but a slice at a time, so a change that arrives
during a pass is taken after at most one slice of resync keys. No clock is involved in a pass: the order in which
keys are taken says it all."""

from __future__ import annotations

import asyncio

from reconciler.clock import FakeClock
from reconciler.resync import Resync
from reconciler.workqueue import WorkQueue


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_a_pass_queues_every_key_yet_a_live_change_waits_behind_one_slice_at_most() -> None:
    queue: WorkQueue[str] = WorkQueue(clock=FakeClock())
    keys = [f"k{i:03d}" for i in range(100)]
    resync = Resync(keys=lambda: keys, enqueue=queue.add, queue=queue, period=300, slice_size=8)
    passing = asyncio.create_task(resync.pass_once())
    await settle()
    assert len(queue) == 8  # one slice, and the pass waits for the workers

    taken = [await queue.get() for _ in range(3)]
    queue.add("live")  # a change arrives while the pass is under way
    while not passing.done() or len(queue):
        key = await queue.get()
        taken.append(key)
        queue.done(key)
        await settle()

    assert await passing == 100
    assert sorted(k for k in taken if k != "live") == keys  # every key, once
    assert taken.index("live") <= 3 + 8  # behind what was queued then, not behind the other 89 keys
    await queue.shutdown()


async def test_a_pass_ends_when_the_queue_shuts_down_under_it() -> None:
    queue: WorkQueue[str] = WorkQueue(clock=FakeClock())
    resync = Resync(keys=lambda: [f"k{i}" for i in range(50)], enqueue=queue.add, queue=queue, period=300,
                    slice_size=4)  # fmt: skip
    passing = asyncio.create_task(resync.pass_once())
    await settle()
    await queue.shutdown()
    assert await asyncio.wait_for(passing, 5) == 50  # the rest is dropped by the queue, as any add after shutdown


async def test_passes_come_every_period() -> None:
    clock = FakeClock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    passes: list[int] = []
    resync = Resync(keys=lambda: ["a", "b"], enqueue=queue.add, queue=queue, period=100, clock=clock,
                    on_pass=passes.append)  # fmt: skip
    running = asyncio.create_task(resync.run())
    await settle()
    clock.advance(89)
    await settle()
    assert passes == []  # not before 90% of the period
    clock.advance(22)
    await settle()
    assert passes == [2]
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await queue.shutdown()
