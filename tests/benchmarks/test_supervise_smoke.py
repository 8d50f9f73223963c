"""The supervisord comparison runs end to end at a tiny size (no timing is asserted: that is the benchmark's
job, run by hand with `make bench-supervise`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("supervisor") is None, reason="supervisor (dev extra) is not installed")
def test_the_benchmark_restarts_every_killed_process_under_both_supervisors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.supervise", "--processes", "2", "--kills", "3", "--idle-seconds", "0.5",
         "--spacing", "0.2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for side in ("supervisord", "setpoint"):
        restart = result[side]["restart"]
        assert (restart["kills"], restart["restarted"], restart["missed"]) == (3, 3, 0), (side, restart)
        assert 0 < restart["p50_ms"] <= restart["p99_ms"] <= restart["max_ms"]
        assert result[side]["idle_cpu_seconds"] >= 0
    assert result["setpoint"]["etcd_idle_cpu_seconds"] >= 0
