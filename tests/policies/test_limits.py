"""The limits are exact under a fake clock: windows slide, budgets wait their turn, pauses need a majority."""

from __future__ import annotations

import asyncio

import pytest

from policies.limits import FlapGuard, MutationBudget, healing_paused
from reconciler.clock import FakeClock


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def test_flap_guard_allows_n_plans_per_window_then_blocks_until_the_oldest_leaves() -> None:
    clock = Clock()
    guard = FlapGuard(max_plans=3, window=600, now=clock.now)

    for _ in range(3):
        assert guard.blocked_for("k") is None
        guard.record("k")
        clock.t += 10

    assert guard.blocked_for("k") == pytest.approx(570)
    assert "3 plans already ran" in guard.reason("k")
    assert guard.blocked_for("other") is None, "the guard is per key"
    clock.t += 570
    assert guard.blocked_for("k") is None


def test_flap_guard_forgets_keys_whose_window_emptied() -> None:
    clock = Clock()
    guard = FlapGuard(max_plans=1, window=5, now=clock.now)
    guard.record("k")
    clock.t += 5

    assert guard.blocked_for("k") is None
    assert guard._executed == {}


async def test_mutation_budget_waits_for_the_oldest_slot_to_expire() -> None:
    clock = Clock()
    budget = MutationBudget(per_minute=2, now=clock.now, sleep=clock.sleep)

    assert await budget.acquire() == 0
    clock.t += 20
    assert await budget.acquire() == 0
    waited = await budget.acquire()

    assert waited == pytest.approx(40)
    assert clock.slept == [pytest.approx(40)]
    assert budget.in_window == 2


async def test_mutation_budget_serves_waiters_in_order() -> None:
    """A caller arriving in the very instant a slot frees must not take it from one already waiting.

    The fake clock's sleep really suspends, so the waiters interleave as they do on a real loop.
    """
    clock = FakeClock(1000)
    budget = MutationBudget(per_minute=1, now=clock.now, sleep=clock.sleep)
    order: list[str] = []

    async def take(name: str) -> None:
        await budget.acquire()
        order.append(f"{name}@{clock.now():g}")

    await take("first")
    waiting = [asyncio.create_task(take(f"waiter{i}")) for i in range(2)]
    for _ in range(3):
        await asyncio.sleep(0)  # both are now waiting for a slot
    newcomer = asyncio.create_task(take("newcomer"))  # scheduled, not yet running...
    clock.advance(60)  # ...when the first slot frees
    for _ in range(3):
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(60)
    await asyncio.gather(*waiting, newcomer)

    assert order == ["first@1000", "waiter0@1060", "waiter1@1120", "newcomer@1180"]


@pytest.mark.parametrize(
    ("unhealthy", "total", "paused"),
    [(0, 10, False), (4, 10, False), (5, 10, True), (2, 2, False), (3, 3, True), (3, 100, False), (1, 0, False)],
)
def test_healing_pauses_only_past_the_fraction_and_the_minimum(unhealthy: int, total: int, paused: bool) -> None:
    reason = healing_paused(kind="file", unhealthy=unhealthy, total=total, max_fraction=0.4, min_count=3)

    assert (reason is not None) is paused
    if reason:
        assert f"{unhealthy} of {total}" in reason


async def test_mutation_budget_says_how_long_until_a_slot_frees() -> None:
    clock = Clock()
    budget = MutationBudget(per_minute=2, now=clock.now, sleep=clock.sleep)

    assert budget.wait_time() == 0
    await budget.acquire()
    clock.t += 15
    await budget.acquire()

    assert budget.wait_time() == pytest.approx(45)
    clock.t += 45
    assert budget.wait_time() == 0


def test_flap_guard_reason_names_the_last_failure_instead_of_blaming_drift() -> None:
    clock = Clock()
    guard = FlapGuard(max_plans=2, window=600, now=clock.now)
    for _ in range(2):
        guard.record("k")
        guard.settled("k", error="step 1 (file.write): writing /srv/x failed: Is a directory")

    failing = guard.reason("k")
    guard.settled("k", error=None)
    drifting = guard.reason("k")

    assert "the last one failed: step 1 (file.write): writing /srv/x failed: Is a directory" in failing
    assert "undoing" not in failing
    assert "something keeps undoing them" in drifting


async def test_mutation_budget_try_acquire_never_waits_and_never_jumps_the_queue() -> None:
    clock = FakeClock(1000)
    budget = MutationBudget(per_minute=1, now=clock.now, sleep=clock.sleep)

    assert budget.try_acquire() is True
    assert budget.try_acquire() is False, "the minute's one slot is taken"
    waiter = asyncio.create_task(budget.acquire())
    await asyncio.sleep(0)
    clock.advance(60)
    assert budget.try_acquire() is False, "a slot that frees goes to the one already waiting"
    await waiter


def test_flap_guard_takes_plans_from_before_a_restart_by_age_and_claims_nothing_about_them() -> None:
    clock = Clock()
    guard = FlapGuard(max_plans=2, window=600, now=clock.now)

    guard.record("k", ago=500)
    guard.record("k", ago=30)

    assert guard.blocked_for("k") == pytest.approx(100), "the oldest leaves the window 100 s from now"
    assert guard.ages("k") == [pytest.approx(500), pytest.approx(30)]
    reason = guard.reason("k")
    assert "failed" not in reason and "undoing" not in reason, reason
