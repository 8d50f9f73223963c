"""The hourly spend on models, as a rolling window of charges.

Every call to a model is charged at its configured prices the moment it
ends (`charge`). What is left is `usd_per_hour` minus the charges of the
last 3600 seconds; a charge stops counting exactly one hour after it was
made, so spend frees up gradually rather than at the top of each hour.
`usd_per_hour=None` means no limit: `remaining()` is None and the budget is
never spent. A limit of 0 is spent from the start (models are configured
but must not be called).

The router checks `spent()` before every call and, when it is, tells its
caller to come back in `frees_in()` seconds: when enough of the oldest
charges have left the window for the spend to drop below the limit again.
A call already under way is never cut short, so the spend can overshoot the
limit by at most the calls in flight.

The clock is injected (`now`, monotonic seconds).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 3600.0
_EPSILON = 1e-9  # USD: sums of float charges that land on the limit count as reaching it


class Budget:
    """Spend per rolling hour. Defaults: no limit, `time.monotonic`."""

    def __init__(self, usd_per_hour: float | None = None, *, now: Callable[[], float] = time.monotonic) -> None:
        if usd_per_hour is not None and usd_per_hour < 0:
            raise ValueError("usd_per_hour must not be negative")
        self.usd_per_hour = usd_per_hour
        self._now = now
        self._charges: deque[tuple[float, float]] = deque()  # (when, usd), oldest first

    def charge(self, usd: float) -> None:
        """Count `usd` spent now (free calls are not stored)."""
        if usd < 0:
            raise ValueError("a charge must not be negative")
        if usd > 0:
            self._charges.append((self._now(), usd))
        self._expire()

    def spent_in_window(self) -> float:
        """USD charged in the last hour."""
        self._expire()
        return sum(usd for _, usd in self._charges)

    def remaining(self) -> float | None:
        """USD left in the rolling hour (0 after an overshoot: a call's cost is known only once it is made);
        None when there is no limit."""
        if self.usd_per_hour is None:
            return None
        return max(0.0, self.usd_per_hour - self.spent_in_window())

    def spent(self) -> bool:
        """True when there is a limit and nothing is left of it."""
        remaining = self.remaining()
        return remaining is not None and remaining < _EPSILON

    def frees_in(self) -> float:
        """Seconds until the budget is no longer spent: 0 when it is not; a whole window for a limit of 0."""
        if self.usd_per_hour is None or not self.spent():
            return 0.0
        if self.usd_per_hour == 0:
            return WINDOW_SECONDS
        now = self._now()
        total = sum(usd for _, usd in self._charges)
        for when, usd in self._charges:
            total -= usd
            if total <= self.usd_per_hour - _EPSILON:
                return max(0.0, when + WINDOW_SECONDS - now)
        return WINDOW_SECONDS  # unreachable while spent: dropping every charge leaves 0 < usd_per_hour

    def _expire(self) -> None:
        horizon = self._now() - WINDOW_SECONDS
        while self._charges and self._charges[0][0] <= horizon:
            self._charges.popleft()
