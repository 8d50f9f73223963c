"""The circuit breaker on a hand-moved clock: closed -> open after N failures, half-open after T, one trial."""

from __future__ import annotations

import pytest

from llm_router.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(clock: Clock, failures: int = 3, reset: float = 60.0) -> CircuitBreaker:
    return CircuitBreaker(failures=failures, reset_seconds=reset, now=clock)


def test_opens_after_n_consecutive_failures() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED and b.allows()
    b.failure()
    assert b.state is BreakerState.OPEN
    assert not b.allows()
    assert b.ready_in() == 60.0


def test_a_success_resets_the_count() -> None:
    clock = Clock()
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert b.state is BreakerState.CLOSED


def test_half_opens_after_reset_and_lets_one_trial_through() -> None:
    clock = Clock()
    b = breaker(clock, failures=1, reset=30.0)
    b.failure()
    clock.t += 29.9
    assert not b.allows()
    assert b.ready_in() == pytest.approx(0.1)
    clock.t += 0.1
    assert b.state is BreakerState.HALF_OPEN
    assert b.ready_in() == 0.0
    assert b.allows()
    assert not b.allows()  # only one trial
    assert b.ready_in() == 30.0


def test_trial_success_closes() -> None:
    clock = Clock()
    b = breaker(clock, failures=2, reset=10.0)
    b.failure()
    b.failure()
    clock.t += 10
    assert b.allows()
    b.success()
    assert b.state is BreakerState.CLOSED
    assert b.allows() and b.allows()
    b.failure()
    assert b.state is BreakerState.CLOSED  # the count started again


def test_trial_failure_reopens_for_another_period() -> None:
    clock = Clock()
    b = breaker(clock, failures=2, reset=10.0)
    b.failure()
    b.failure()
    clock.t += 15
    assert b.allows()
    b.failure()  # one failure is enough in half-open
    assert b.state is BreakerState.OPEN
    assert b.ready_in() == 10.0
    clock.t += 10
    assert b.allows()


def test_an_unreported_trial_lapses() -> None:
    clock = Clock()
    b = breaker(clock, failures=1, reset=10.0)
    b.failure()
    clock.t += 10
    assert b.allows()  # this caller is cancelled and never reports
    clock.t += 9
    assert not b.allows()
    clock.t += 1
    assert b.allows()


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        CircuitBreaker(failures=0, reset_seconds=1.0)
    with pytest.raises(ValueError, match="reset_seconds > 0"):
        CircuitBreaker(failures=1, reset_seconds=0.0)
