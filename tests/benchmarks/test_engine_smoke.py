"""The engine benchmark runs every scenario end to end at even tinier sizes than `--quick` (no figure is
checked against anything: that is the benchmark's job, run by hand with `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["ingest", "coalescing", "latency", "throughput", "resync", "cold_start", "memory", "llm_flapping"]
# The start of the name of a figure each scenario always reports (its value may be missing when a wait ran out,
# never its row).
KEY_FIGURES = {
    "ingest": "ratio setpoint / etcdctl",
    "coalescing": "reconciles run",
    "latency": "p99 put -> Converged",
    "throughput": "etcd put rate (same generator)",
    "resync": "full resync pass",
    "cold_start": "to /readyz 200",
    "memory": "RSS with",
    "llm_flapping": "model calls (fake server)",
}


def test_every_scenario_reports_its_figures() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", "--quick", "--scale", "0.3", "--quiet", "--json", "-"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert result["machine"]["cores"] >= 1 and result["machine"]["etcd"]
    assert result["command"].startswith("python -m benchmarks.engine --quick")
    assert list(result["scenarios"]) == SCENARIOS
    for name, scenario in result["scenarios"].items():
        assert scenario["error"] is None, (name, scenario["error"], scenario["details"].get("traceback"))
        assert any(f.startswith(KEY_FIGURES[name]) for f in scenario["figures"]), (name, list(scenario["figures"]))
        for figure, row in scenario["figures"].items():
            assert set(row) == {"value", "unit", "target", "met"}, (name, figure, row)
            assert row["value"] is None or isinstance(row["value"], int | float | str | bool), (name, figure, row)
            assert row["met"] in (True, False, None), (name, figure, row)
            assert row["target"] is not None or row["met"] is None, (name, figure, row)
    assert "scenario" in done.stderr and "figure" in done.stderr, "the table goes to stderr with --json -"
