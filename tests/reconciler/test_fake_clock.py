"""FakeClock: time moves only on `advance`, and sleepers wake exactly when it passes their deadline."""

from __future__ import annotations

import asyncio

from reconciler.clock import FakeClock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_now_moves_only_when_advanced() -> None:
    clock = FakeClock(start=100.0)
    assert clock.now() == 100.0
    await settle()
    assert clock.now() == 100.0
    clock.advance(2.5)
    assert clock.now() == 102.5


async def test_a_sleeper_wakes_exactly_at_its_deadline() -> None:
    clock = FakeClock()
    sleeper = asyncio.create_task(clock.sleep(3.0))
    await settle()
    clock.advance(2.0)
    await settle()
    assert not sleeper.done()
    clock.advance(1.0)
    await settle()
    assert sleeper.done()


async def test_one_advance_wakes_every_sleeper_it_passes_and_only_those() -> None:
    clock = FakeClock()
    sleepers = {d: asyncio.create_task(clock.sleep(d)) for d in (1.0, 2.0, 5.0)}
    await settle()
    clock.advance(2.0)
    await settle()
    assert {d: t.done() for d, t in sleepers.items()} == {1.0: True, 2.0: True, 5.0: False}
    sleepers[5.0].cancel()


async def test_a_zero_sleep_returns_without_advancing() -> None:
    clock = FakeClock()
    await asyncio.wait_for(clock.sleep(0), timeout=1.0)
    assert clock.now() == 0.0


async def test_a_cancelled_sleeper_does_not_break_advance() -> None:
    clock = FakeClock()
    cancelled = asyncio.create_task(clock.sleep(1.0))
    kept = asyncio.create_task(clock.sleep(1.0))
    await settle()
    cancelled.cancel()
    await settle()
    clock.advance(1.0)
    await settle()
    assert cancelled.cancelled()
    assert kept.done()
