"""The metric table of README.md's "HTTP and metrics" section, read as data, and what a registry exposes, read
from its text exposition the way Prometheus reads it; so tests can hold the two to each other."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

README = Path(__file__).resolve().parents[1] / "README.md"

# One metric: its type and its label names.
Shape = tuple[str, frozenset[str]]

_ROW = re.compile(r"^\| `(?P<name>setpoint_[a-z_]+)` \| (?P<type>[a-z]+) \|(?P<labels>[^|]*)\|")


def documented() -> dict[str, Shape]:
    """Each metric in the README's table: its exposed name, type and label names (the backquoted words of the
    labels column outside parentheses, which hold the values)."""
    text = README.read_text()
    section = text.split("\n## HTTP and metrics\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, Shape] = {}
    for line in section.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        assert match["name"] not in rows, f"{match['name']} is in the README table twice"
        names = re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", match["labels"]))
        rows[match["name"]] = (match["type"], frozenset(names))
    assert rows, "no metric table found in the README's HTTP and metrics section"
    return rows


def exposed(registry: CollectorRegistry) -> dict[str, Shape]:
    """Each metric family in the registry's exposition: its name (counters with `_total`), type and the label
    names its samples carry (a histogram's `le` aside; none for a family without samples).

    The `<name>_created` gauge prometheus_client adds beside each counter and histogram is left out: the
    README says so once, in prose."""
    families: dict[str, Shape] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = frozenset(label for sample in family.samples for label in sample.labels if label != "le")
        families[name] = (family.type, labels)
    for name in [n for n, (kind, _) in families.items() if kind == "gauge" and n.endswith("_created")]:
        base = name.removesuffix("_created")
        if families.get(f"{base}_total", ("",))[0] == "counter" or families.get(base, ("",))[0] == "histogram":
            del families[name]
    return families
