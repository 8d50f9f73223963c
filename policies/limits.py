"""Limits that keep automation from doing too much, too often: the flap guard, the mutation budget
and the max-unhealthy pause.

They are pure bookkeeping over an injected clock (`now()` in monotonic
seconds), so their behaviour is exact under test. The controller consults
them; they never act themselves.

- FlapGuard: at most `max_plans` executed plans per key within a sliding
  `window` (Argo CD's self-heal backoff idea): a resource that keeps drifting
  back is a symptom to be looked at, not something to fight forever. It also
  remembers how the last plan ended, so the reason it gives is the truth:
  plans that keep failing are reported with their error, not as drift that
  something keeps undoing. Plans from before a restart can be recorded with
  their age, so a restart does not reset the window.
- MutationBudget: at most `per_minute` mutating steps across all keys in any
  60 s window; the rest wait their turn.
- healing_paused: when more than `max_fraction` of a kind's resources need
  healing at once (and at least `min_count` of them), something bigger is
  wrong than any one resource: stop healing that kind and say so (Cluster
  API's maxUnhealthy).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """The limits' settings: the `limits` section of the policy file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flap_max_plans: int = Field(
        default=6, ge=1, description="Executed plans allowed per resource per flap window. Defaults to 6."
    )
    flap_window_seconds: float = Field(
        default=600.0, gt=0, description="The flap guard's sliding window. Defaults to 600 s (10 minutes)."
    )
    max_mutating_steps_per_minute: int = Field(
        default=60, ge=1,
        description="Mutating (not read_only) steps run per minute across all keys; the rest wait. Defaults to 60.",
    )  # fmt: skip
    max_unhealthy_fraction: float = Field(
        default=0.4, gt=0, le=1,
        description="When more than this share of a kind's resources need healing at once, automatic healing of "
        "that kind pauses. Defaults to 0.4.",
    )  # fmt: skip
    max_unhealthy_min_count: int = Field(
        default=3, ge=1,
        description="The pause needs at least this many resources needing healing, so one drifted file of two "
        "does not stop all healing. Defaults to 3.",
    )  # fmt: skip


class FlapGuard:
    def __init__(self, *, max_plans: int, window: float, now: Callable[[], float]) -> None:
        if max_plans < 1 or window <= 0:
            raise ValueError("the flap guard needs max_plans >= 1 and window > 0")
        self.max_plans = max_plans
        self.window = window
        self._now = now
        self._executed: dict[Hashable, deque[float]] = {}
        self._last_error: dict[Hashable, str | None] = {}  # absent: how the last plan ended is not known

    def _recent(self, key: Hashable) -> deque[float]:
        times = self._executed.get(key)
        if times is None:
            return deque()
        horizon = self._now() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._executed[key]
            self._last_error.pop(key, None)
        return times

    def blocked_for(self, key: Hashable) -> float | None:
        """Seconds until `key` may run another plan, or None if it may run one now."""
        times = self._recent(key)
        if len(times) < self.max_plans:
            return None
        return max(0.0, times[0] + self.window - self._now())

    def reason(self, key: Hashable) -> str:
        # No countdown here: the reason must stay the same while the key stays blocked.
        head = f"flap guard: {self.max_plans} plans already ran for this resource within {self.window:g} s"
        resume = "automatic changes resume when the oldest leaves that window"
        if key not in self._last_error:  # plans from before a restart: how they ended is not known here
            return f"{head}; {resume}"
        error = self._last_error[key]
        if error is not None:
            return f"{head}, and the last one failed: {error}; {resume}"
        return f"{head}, and each time it drifted again: something keeps undoing them; {resume}"

    def record(self, key: Hashable, *, ago: float = 0.0) -> None:
        """Count one executed plan for `key`, begun `ago` seconds before now (record them oldest first)."""
        self._recent(key)
        self._executed.setdefault(key, deque()).append(self._now() - ago)

    def ages(self, key: Hashable) -> list[float]:
        """How many seconds ago each plan in `key`'s window began, oldest first."""
        now = self._now()
        return [now - at for at in self._recent(key)]

    def configure(self, *, max_plans: int, window: float) -> None:
        """New limits (a policy reload); what was counted so far is kept."""
        if max_plans < 1 or window <= 0:
            raise ValueError("the flap guard needs max_plans >= 1 and window > 0")
        self.max_plans, self.window = max_plans, window

    def settled(self, key: Hashable, *, error: str | None) -> None:
        """How `key`'s last executed plan ended: None when it succeeded, else its error."""
        if key in self._executed:
            self._last_error[key] = error


class MutationBudget:
    """At most `per_minute` acquisitions in any 60 s window; `acquire` waits for a free slot."""

    WINDOW = 60.0

    def __init__(
        self, *, per_minute: int, now: Callable[[], float], sleep: Callable[[float], Awaitable[None]]
    ) -> None:
        if per_minute < 1:
            raise ValueError("the mutation budget needs per_minute >= 1")
        self.per_minute = per_minute
        self._now = now
        self._sleep = sleep
        self._taken: deque[float] = deque()
        self._lock = asyncio.Lock()  # first come, first served

    def configure(self, *, per_minute: int) -> None:
        """A new budget (a policy reload); the slots taken in the last minute still count."""
        if per_minute < 1:
            raise ValueError("the mutation budget needs per_minute >= 1")
        self.per_minute = per_minute

    def _expire(self) -> None:
        horizon = self._now() - self.WINDOW
        while self._taken and self._taken[0] <= horizon:
            self._taken.popleft()

    async def acquire(self) -> float:
        """Take one slot, waiting as long as needed; returns the seconds waited."""
        waited = 0.0
        async with self._lock:
            while True:
                self._expire()
                if len(self._taken) < self.per_minute:
                    self._taken.append(self._now())
                    return waited
                delay = self._taken[0] + self.WINDOW - self._now()
                waited += delay
                await self._sleep(delay)

    def try_acquire(self) -> bool:
        """Take a slot if one is free now and nobody is waiting for one; never waits."""
        if self._lock.locked():
            return False
        self._expire()
        if len(self._taken) >= self.per_minute:
            return False
        self._taken.append(self._now())
        return True

    def wait_time(self) -> float:
        """Seconds until a slot is free (0 when one is free now); waiters already queued are not counted."""
        self._expire()
        if len(self._taken) < self.per_minute:
            return 0.0
        return max(0.0, self._taken[0] + self.WINDOW - self._now())

    @property
    def in_window(self) -> int:
        self._expire()
        return len(self._taken)


def healing_paused(*, kind: str, unhealthy: int, total: int, max_fraction: float, min_count: int) -> str | None:
    """Why healing of `kind` is paused, or None when it may go on."""
    if total <= 0 or unhealthy < min_count or unhealthy <= max_fraction * total:
        return None
    return (
        f"healing of kind {kind!r} is paused: {unhealthy} of {total} resources need healing at once, "
        f"more than {max_fraction:.0%}; look for a common cause, healing resumes when fewer are unhealthy"
    )
