"""RiskLevel: compared by rank (`read_only < low < medium < high < critical`), stored and shown by name.

The rank order differs from the alphabetical one on purpose in these tests
(alphabetically `critical < high < low < medium < read_only`), so a
comparison that fell back to string order would be caught.
"""

from __future__ import annotations

import itertools

import pytest
from pydantic import BaseModel, ValidationError

from plans import RiskLevel
from plans.risk import max_risk

ORDER = [RiskLevel.READ_ONLY, RiskLevel.LOW, RiskLevel.MEDIUM, RiskLevel.HIGH, RiskLevel.CRITICAL]


class _HasRisk(BaseModel):
    risk: RiskLevel


def test_every_pair_compares_by_rank() -> None:
    for lower, higher in itertools.combinations(ORDER, 2):
        assert lower < higher
        assert lower <= higher
        assert higher > lower
        assert higher >= lower
        assert not higher < lower
        assert not higher <= lower


def test_a_level_equals_itself_and_is_not_less_than_itself() -> None:
    for level in ORDER:
        assert level <= level
        assert level >= level
        assert not level < level
        assert not level > level


def test_sorting_follows_rank_not_name() -> None:
    assert sorted(reversed(ORDER)) == ORDER
    assert max(RiskLevel.HIGH, RiskLevel.LOW, RiskLevel.READ_ONLY) is RiskLevel.HIGH


def test_max_risk_is_the_highest_level_and_read_only_when_there_are_none() -> None:
    assert max_risk() is RiskLevel.READ_ONLY
    assert max_risk(RiskLevel.HIGH, RiskLevel.LOW, RiskLevel.READ_ONLY) is RiskLevel.HIGH
    assert max_risk(RiskLevel.MEDIUM, RiskLevel.CRITICAL, RiskLevel.LOW) is RiskLevel.CRITICAL


def test_levels_are_shown_and_stored_by_name() -> None:
    assert [str(level) for level in ORDER] == ["read_only", "low", "medium", "high", "critical"]
    assert f"risk {RiskLevel.READ_ONLY}" == "risk read_only"
    assert _HasRisk(risk=RiskLevel.HIGH).model_dump_json() == '{"risk":"high"}'


def test_levels_are_read_back_from_their_names() -> None:
    for level in ORDER:
        assert RiskLevel(level.value) is level
        assert _HasRisk.model_validate_json(f'{{"risk":"{level.value}"}}').risk is level


def test_an_unknown_name_is_rejected() -> None:
    with pytest.raises(ValidationError):
        _HasRisk.model_validate_json('{"risk":"severe"}')
    with pytest.raises(ValueError):
        RiskLevel("HIGH")


def test_a_plain_string_naming_a_level_compares_by_rank_on_either_side() -> None:
    # Alphabetically "critical" <= "medium"; by rank it is not. A threshold written as a string must not
    # let a critical plan through.
    assert not RiskLevel.CRITICAL <= "medium"
    assert RiskLevel.CRITICAL > "medium"
    assert RiskLevel.LOW < "medium"
    assert RiskLevel.READ_ONLY < "low"
    assert not "medium" >= RiskLevel.CRITICAL
    assert "read_only" < RiskLevel.LOW


@pytest.mark.parametrize("other", ["severe", "HIGH", "", 3, None])
def test_comparing_with_anything_but_a_level_or_its_name_is_a_type_error(other: object) -> None:
    with pytest.raises(TypeError):
        RiskLevel.HIGH <= other  # type: ignore[operator]  # noqa: B015
    with pytest.raises(TypeError):
        RiskLevel.HIGH > other  # type: ignore[operator]  # noqa: B015
