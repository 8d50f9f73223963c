"""`age`, as the tables show it, for whatever a probe wrote as a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.cli.common import age

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("when", "shown"),
    [((NOW - timedelta(minutes=3)).isoformat(), "3m"), (NOW - timedelta(hours=2), "2h"), (None, "-"),
     ("yesterday", "-"), (1763800000, "-"), (1.5, "-"), ({"at": 1}, "-")],
)  # fmt: skip
def test_age_shows_a_dash_for_what_is_not_a_time(when: Any, shown: str) -> None:
    assert age(when, now=NOW) == shown
