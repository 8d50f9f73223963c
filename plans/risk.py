"""Risk levels, ordered `read_only < low < medium < high < critical`.

Stored and shown by name; compared by rank. A step's effective risk is the
larger of the tool's declared risk and what the planner claims, so a planner
can raise a step's risk but never lower it.
"""

from __future__ import annotations

from enum import StrEnum


class RiskLevel(StrEnum):
    READ_ONLY = "read_only"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]

    # RiskLevel is a str, so without these a comparison with a plain string would
    # fall back to str's alphabetical order ("critical" < "medium"). A plain
    # string is compared by the rank of the level it names; any other string is a TypeError.
    def __lt__(self, other: object) -> bool:
        return self.rank < _rank_of(other)

    def __le__(self, other: object) -> bool:
        return self.rank <= _rank_of(other)

    def __gt__(self, other: object) -> bool:
        return self.rank > _rank_of(other)

    def __ge__(self, other: object) -> bool:
        return self.rank >= _rank_of(other)

    def __str__(self) -> str:
        return self.value


_RANK = {level: i for i, level in enumerate(RiskLevel)}


def _rank_of(other: object) -> int:
    if isinstance(other, RiskLevel):
        return other.rank
    if isinstance(other, str):
        try:
            return RiskLevel(other).rank
        except ValueError:
            raise TypeError(f"cannot compare a risk level with {other!r}") from None
    raise TypeError(f"cannot compare a risk level with {type(other).__name__}")


def max_risk(*levels: RiskLevel) -> RiskLevel:
    """The highest of `levels`; `read_only` when there are none."""
    return max(levels, default=RiskLevel.READ_ONLY, key=lambda level: level.rank)
