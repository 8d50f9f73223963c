"""The rolling hourly budget on a hand-moved clock."""

from __future__ import annotations

import pytest

from llm_router.budget import WINDOW_SECONDS, Budget


class Clock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


def test_no_limit_is_never_spent() -> None:
    budget = Budget(None, now=Clock())
    budget.charge(1e9)
    assert budget.remaining() is None
    assert not budget.spent()
    assert budget.frees_in() == 0.0


def test_remaining_counts_down_and_spent_at_zero() -> None:
    budget = Budget(1.0, now=Clock())
    assert budget.remaining() == 1.0
    budget.charge(0.25)
    budget.charge(0.25)
    assert budget.remaining() == pytest.approx(0.5)
    assert not budget.spent()
    budget.charge(0.5)
    assert budget.spent()


def test_float_sums_that_land_on_the_limit_spend_it() -> None:
    budget = Budget(0.3, now=Clock())
    budget.charge(0.1)
    budget.charge(0.2)  # 0.30000000000000004 or 0.29999999999999993 must not matter
    assert budget.spent()


def test_charges_leave_the_window_after_an_hour() -> None:
    clock = Clock()
    budget = Budget(1.0, now=clock)
    budget.charge(0.6)
    clock.t += 1800
    budget.charge(0.6)
    assert budget.spent()
    assert budget.frees_in() == 1800.0  # when the first charge leaves
    clock.t += 1799
    assert budget.spent()
    clock.t += 1
    assert not budget.spent()
    assert budget.remaining() == pytest.approx(0.4)
    clock.t += WINDOW_SECONDS
    assert budget.remaining() == 1.0


def test_frees_in_waits_for_enough_charges_to_leave() -> None:
    clock = Clock()
    budget = Budget(1.0, now=clock)
    budget.charge(0.1)  # t=0
    clock.t += 100
    budget.charge(0.5)  # t=100
    clock.t += 100
    budget.charge(0.9)  # t=200: 1.5 spent
    # Dropping the 0.1 leaves 1.4, dropping the 0.5 too leaves 0.9 < 1.0: the second charge must leave.
    assert budget.frees_in() == WINDOW_SECONDS - 100
    clock.t += budget.frees_in()
    assert not budget.spent()


def test_a_zero_limit_is_spent_from_the_start() -> None:
    budget = Budget(0.0, now=Clock())
    assert budget.spent()
    assert budget.frees_in() == WINDOW_SECONDS


def test_free_calls_cost_nothing_and_negative_charges_are_refused() -> None:
    budget = Budget(1.0, now=Clock())
    budget.charge(0.0)
    assert budget.remaining() == 1.0
    with pytest.raises(ValueError):
        budget.charge(-1.0)
