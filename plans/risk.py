"""Risk levels, ordered `read_only < low < medium < high < critical`.

Stored and shown by name; compared by rank. A step's effective risk is the
larger of the tool's declared risk and what the planner claims, so a planner
can raise a step's risk but never lower it.
"""

from __future__ import annotations

from enum import Enum


class RiskLevel(str, Enum):
    READ_ONLY = "read_only"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, RiskLevel):
            return NotImplemented
        return self.rank >= other.rank

    def __str__(self) -> str:
        return self.value


_RANK = {level: i for i, level in enumerate(RiskLevel)}


def max_risk(*levels: RiskLevel) -> RiskLevel:
    """The highest of `levels`; `read_only` when there are none."""
    return max(levels, default=RiskLevel.READ_ONLY, key=lambda level: level.rank)
