"""The complexity score: each feature's points and caps as documented, the order of contributions, tiers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llm_router.complexity import Features, score, tier_for
from llm_router.config import RoutingConfig
from llm_router.interfaces import Tier


def points(features: Features) -> dict[str, float]:
    return {c.feature: c.points for c in score(features).contributions}


def test_the_easiest_task_scores_zero() -> None:
    result = score(Features())
    assert result.total == 0.0
    assert [c.feature for c in result.contributions] == [
        "changed_fields",
        "changed_resources",
        "issue_severity",
        "candidate_tools",
        "failed_attempts",
        "hint",
    ]
    assert [c.value for c in result.contributions] == [0, 1, None, 0, 0, None]


@pytest.mark.parametrize(
    "features,feature,expected",
    [
        (Features(changed_fields=1), "changed_fields", 0.05),
        (Features(changed_fields=5), "changed_fields", 0.25),
        (Features(changed_fields=50), "changed_fields", 0.25),
        (Features(changed_resources=0), "changed_resources", 0.0),
        (Features(changed_resources=2), "changed_resources", 0.05),
        (Features(changed_resources=4), "changed_resources", 0.15),
        (Features(changed_resources=40), "changed_resources", 0.15),
        (Features(issue_severity="info"), "issue_severity", 0.05),
        (Features(issue_severity="warning"), "issue_severity", 0.15),
        (Features(issue_severity="critical"), "issue_severity", 0.30),
        (Features(candidate_tools=2), "candidate_tools", 0.0),
        (Features(candidate_tools=3), "candidate_tools", 0.02),
        (Features(candidate_tools=7), "candidate_tools", 0.10),
        (Features(candidate_tools=70), "candidate_tools", 0.10),
        (Features(failed_attempts=1), "failed_attempts", 0.15),
        (Features(failed_attempts=3), "failed_attempts", 0.45),
        (Features(failed_attempts=9), "failed_attempts", 0.45),
        (Features(hint=0.5), "hint", 0.10),
        (Features(hint=1.0), "hint", 0.20),
    ],
)
def test_points_and_caps(features: Features, feature: str, expected: float) -> None:
    assert points(features)[feature] == expected
    assert score(features).total == expected


def test_total_is_the_sum_rounded_so_thresholds_are_reached_exactly() -> None:
    features = Features(changed_fields=3, issue_severity="warning")  # 0.15 + 0.15 in floats is 0.30000000000000004
    assert score(features).total == 0.3
    assert tier_for(score(features).total, RoutingConfig()) is Tier.STANDARD


def test_total_is_capped_at_one() -> None:
    everything = Features(
        changed_fields=9, changed_resources=9, issue_severity="critical", candidate_tools=9, failed_attempts=9, hint=1
    )
    result = score(everything)
    assert sum(c.points for c in result.contributions) == pytest.approx(1.45)
    assert result.total == 1.0


@pytest.mark.parametrize(
    "total,expected",
    [(0.0, Tier.SMALL), (0.29, Tier.SMALL), (0.3, Tier.STANDARD), (0.59, Tier.STANDARD), (0.6, Tier.LARGE)],
)
def test_tier_for_default_thresholds(total: float, expected: Tier) -> None:
    assert tier_for(total, RoutingConfig()) is expected


def test_tier_for_custom_thresholds() -> None:
    routing = RoutingConfig(standard_at=0.1, large_at=0.1)
    assert tier_for(0.05, routing) is Tier.SMALL
    assert tier_for(0.1, routing) is Tier.LARGE  # standard has an empty range


@pytest.mark.parametrize(
    "field,value",
    [("changed_fields", -1), ("failed_attempts", -1), ("hint", 1.5), ("hint", -0.1), ("issue_severity", "fatal")],
)
def test_features_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Features.model_validate({field: value})


def test_features_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Features().changed_fields = 3  # type: ignore[misc]
