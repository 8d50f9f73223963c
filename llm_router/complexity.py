"""How hard a planning task looks, as a score from 0 to 1, and the tier of model that score calls for.

The score is a sum of points per feature, each capped, the total capped at
1. It is pure and deterministic, so `setpoint llm route` can show exactly
why a task went to the tier it did, one line per feature:

| feature             | points                                          | at most |
|---------------------|-------------------------------------------------|---------|
| `changed_fields`    | 0.05 per field of the desired state that differs | 0.25    |
| `changed_resources` | 0.05 per resource beyond the first               | 0.15    |
| `issue_severity`    | info 0.05, warning 0.15, critical 0.30; none 0   | 0.30    |
| `candidate_tools`   | 0.02 per tool beyond the first two               | 0.10    |
| `failed_attempts`   | 0.15 per earlier failed attempt for this key     | 0.45    |
| `hint`              | the agent's own 0..1 estimate, times 0.20        | 0.20    |

Earlier failures weigh most: a key that a small model has failed on
before should not go back to it. Points and the total are rounded to six
decimals, so sums that land on a threshold (0.15 + 0.15) reach it instead of
falling short by a float's last bit.

`tier_for` maps a total to a tier with the routing thresholds
(`llm.routing`; by default small below 0.3, standard below 0.6, large from
0.6). With the defaults, for example: an info issue alone is small (0.05);
a critical issue alone is standard (0.30); a critical issue after one
failed attempt is standard (0.45); after two it is large (0.60).
The router then moves a tier with no models configured to the nearest
configured one (`Router.tier_for`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_router.config import RoutingConfig
from llm_router.interfaces import Tier

Severity = Literal["info", "warning", "critical"]

SEVERITY_POINTS: dict[Severity | None, float] = {None: 0.0, "info": 0.05, "warning": 0.15, "critical": 0.30}


class Features(BaseModel):
    """What is known about a task before planning it. Every field defaults to the easiest case."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    changed_fields: int = Field(default=0, ge=0, description="Fields of the desired state that differ. Defaults to 0.")
    changed_resources: int = Field(default=1, ge=0, description="Resources the task touches. Defaults to 1.")
    issue_severity: Severity | None = Field(default=None, description="The open issue's severity. Defaults to none.")
    candidate_tools: int = Field(default=0, ge=0, description="Tools the plan may choose from. Defaults to 0.")
    failed_attempts: int = Field(default=0, ge=0, description="Earlier failed attempts for this key. Defaults to 0.")
    hint: float | None = Field(default=None, ge=0, le=1, description="The agent's 0..1 estimate. Defaults to none.")


class Contribution(BaseModel):
    model_config = ConfigDict(frozen=True)

    feature: str
    value: int | float | str | None
    points: float


class Score(BaseModel):
    model_config = ConfigDict(frozen=True)

    total: float = Field(ge=0, le=1)
    contributions: tuple[Contribution, ...]


def _points(features: Features) -> tuple[tuple[str, int | float | str | None, float], ...]:
    return (
        ("changed_fields", features.changed_fields, min(0.05 * features.changed_fields, 0.25)),
        ("changed_resources", features.changed_resources, min(0.05 * max(features.changed_resources - 1, 0), 0.15)),
        ("issue_severity", features.issue_severity, SEVERITY_POINTS[features.issue_severity]),
        ("candidate_tools", features.candidate_tools, min(0.02 * max(features.candidate_tools - 2, 0), 0.10)),
        ("failed_attempts", features.failed_attempts, min(0.15 * features.failed_attempts, 0.45)),
        ("hint", features.hint, (features.hint or 0.0) * 0.20),
    )


def score(features: Features) -> Score:
    """The total (0..1) and each feature's contribution, in the order of the table above."""
    contributions = tuple(
        Contribution(feature=name, value=value, points=round(points, 6)) for name, value, points in _points(features)
    )
    total = round(min(1.0, sum(c.points for c in contributions)), 6)
    return Score(total=total, contributions=contributions)


def tier_for(total: float, routing: RoutingConfig) -> Tier:
    """small below `routing.standard_at`, standard below `routing.large_at`, large from there."""
    if total < routing.standard_at:
        return Tier.SMALL
    if total < routing.large_at:
        return Tier.STANDARD
    return Tier.LARGE
