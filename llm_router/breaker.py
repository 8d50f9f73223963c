"""A per-model circuit breaker: stop calling a model that keeps failing, try it again later, one call at a time.

    closed --(`failures` consecutive failed calls)--> open
    open   --(`reset_seconds` passed)---------------> half-open: `allows()` lets ONE trial call through
    half-open --(the trial succeeds)----------------> closed
    half-open --(the trial fails)-------------------> open again, for another `reset_seconds`

"Failure" is one failed call (a ProviderError of any kind); "success" is any
answer, valid or not: a model that answers nonsense is healthy, just not
good enough, and that is what escalation is for.

`allows()` is the only method that claims something: in half-open it hands
out the single trial. A trial whose caller never reports back (cancelled
while waiting on a rate limit, say) would hold the circuit half-open for
ever, so an unreported trial lapses after another `reset_seconds` and the
next caller gets it. A result reported by a call that started before the
circuit opened still counts: a late success closes it, a late failure
restarts the open period.

The clock is injected (`now`, monotonic seconds), so tests move time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One model's circuit. Defaults: open after 3 consecutive failures, stay open 60 s, `time.monotonic`."""

    def __init__(
        self, *, failures: int = 3, reset_seconds: float = 60.0, now: Callable[[], float] = time.monotonic
    ) -> None:
        if failures < 1 or reset_seconds <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and reset_seconds > 0")
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._now = now
        self._consecutive = 0
        self._opened_at: float | None = None  # set while open or half-open
        self._trial_at: float | None = None  # when the half-open trial was handed out

    @property
    def state(self) -> BreakerState:
        """Open until `reset_seconds` have passed since it opened, then half-open until a result comes back."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._now() - self._opened_at < self.reset_seconds:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allows(self) -> bool:
        """May a call go to this model now? In half-open, True once: the caller makes the trial call."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._now()
        if self._trial_at is not None and now - self._trial_at < self.reset_seconds:
            return False  # the trial is out and has not lapsed
        self._trial_at = now
        return True

    def success(self) -> None:
        """The model answered: close the circuit."""
        self._consecutive = 0
        self._opened_at = None
        self._trial_at = None

    def failure(self) -> None:
        """A call failed: open after `failures` in a row; a failed trial (or any failure while open) re-opens."""
        self._consecutive += 1
        if self._opened_at is not None or self._consecutive >= self.failures:
            self._opened_at = self._now()
            self._trial_at = None

    def cool_down(self, seconds: float) -> None:
        """The provider asked for `seconds` of quiet (a long Retry-After): open until then, whatever the count."""
        until = self._now() + seconds
        if self._opened_at is None or self._opened_at + self.reset_seconds < until:
            self._opened_at = until - self.reset_seconds
            self._trial_at = None

    def ready_in(self) -> float:
        """Seconds until a call may be tried: 0 when `allows()` would say yes now."""
        now = self._now()
        if self._opened_at is None:
            return 0.0
        if now - self._opened_at < self.reset_seconds:
            return self._opened_at + self.reset_seconds - now
        if self._trial_at is not None and now - self._trial_at < self.reset_seconds:
            return self._trial_at + self.reset_seconds - now
        return 0.0
