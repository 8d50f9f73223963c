"""What a scenario produces: named figures, each with its unit, target and whether it was met, and the table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

Value = int | float | str | bool | None


@dataclass(frozen=True)
class Figure:
    name: str
    value: Value
    unit: str = ""
    target: str | None = None  # as shown, e.g. "<= 50 ms"
    met: bool | None = None  # None: no target, or the value could not be had


@dataclass
class Figures:
    """A scenario's figures, in the order they were added; kept when the scenario fails half-way."""

    scenario: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # raw numbers behind the figures, for the JSON
    error: str | None = None
    seconds: float = 0.0

    def add(self, name: str, value: Value, unit: str = "") -> None:
        self.figures.append(Figure(name, _clean(value), unit))

    def check(self, name: str, value: Value, unit: str, target: str, ok: Callable[[Any], bool]) -> None:
        """A figure with a target: `ok(value)` says whether it is met (None when the value is None)."""
        value = _clean(value)
        self.figures.append(Figure(name, value, unit, target, None if value is None else bool(ok(value))))

    def as_json(self) -> dict[str, Any]:
        return {
            "error": self.error, "seconds": round(self.seconds, 3), "details": self.details,
            "figures": {f.name: {k: v for k, v in asdict(f).items() if k != "name"} for f in self.figures},
        }  # fmt: skip


def _clean(value: Value) -> Value:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    return value


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p * len(ordered) / 100)))
    return ordered[rank - 1]


def show(value: Value, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    else:
        text = value
    return f"{text} {unit}".rstrip()


def table(results: list[Figures]) -> str:
    rows = [("scenario", "figure", "value", "target", "met")]
    for result in results:
        for f in result.figures:
            met = "-" if f.met is None else ("yes" if f.met else "NO")
            rows.append((result.scenario, f.name, show(f.value, f.unit), f.target or "", met))
        if result.error is not None:
            rows.append((result.scenario, "ERROR", result.error[:100], "", ""))
        rows.append((result.scenario, "(scenario took)", show(result.seconds, "s"), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
