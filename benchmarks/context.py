"""The sizes a run uses (full, `--quick`, scaled) and what every scenario is handed."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import bulk
from benchmarks.rig import DaemonOptions, Rig, file_resource


@dataclass(frozen=True)
class Sizes:
    """Counts and durations of each scenario. The defaults are the issue's (the full run)."""

    ingest_events: int = 20_000
    coalescing_writes: int = 100_000
    coalescing_keys: int = 1_000
    latency_resources: int = 10_000
    latency_rate: float = 300.0
    latency_seconds: float = 60.0
    throughput_resources: int = 1_000
    throughput_window: float = 10.0  # seconds of load per rate tried
    throughput_start_rate: float = 50.0
    throughput_bisections: int = 3
    resync_resources: int = 10_000
    resync_seconds: float = 60.0  # reconciler.resync_seconds in that scenario: one pass at a time
    cold_start_keys: int = 100_000
    memory_small: int = 10_000
    memory_large: int = 100_000
    llm_seconds: float = 60.0
    llm_flap_seconds: float = 0.1
    concurrency: int = 64  # puts in flight from the load generator


FULL = Sizes()
QUICK = Sizes(
    ingest_events=2_000, coalescing_writes=2_000, coalescing_keys=50, latency_resources=200, latency_rate=50.0,
    latency_seconds=5.0, throughput_resources=100, throughput_window=2.0, throughput_start_rate=25.0,
    throughput_bisections=1, resync_resources=200, resync_seconds=3.0, cold_start_keys=500, memory_small=200,
    memory_large=600, llm_seconds=5.0,
)  # fmt: skip


def scaled(sizes: Sizes, factor: float) -> Sizes:
    """`sizes` with every count and duration times `factor` (rates and the flap period kept), within floors
    that keep each scenario meaningful."""
    if factor == 1.0:
        return sizes

    def count(n: int, floor: int = 10) -> int:
        return max(floor, round(n * factor))

    def seconds(s: float, floor: float = 1.0) -> float:
        return max(floor, s * factor)

    return dataclasses.replace(
        sizes, ingest_events=count(sizes.ingest_events, 100), coalescing_writes=count(sizes.coalescing_writes, 100),
        coalescing_keys=count(sizes.coalescing_keys), latency_resources=count(sizes.latency_resources),
        latency_seconds=seconds(sizes.latency_seconds), throughput_resources=count(sizes.throughput_resources),
        throughput_window=seconds(sizes.throughput_window), resync_resources=count(sizes.resync_resources),
        resync_seconds=seconds(sizes.resync_seconds, 2.0), cold_start_keys=count(sizes.cold_start_keys, 100),
        memory_small=count(sizes.memory_small), memory_large=count(sizes.memory_large, 20),
        llm_seconds=seconds(sizes.llm_seconds, 2.0),
    )  # fmt: skip


@dataclass(frozen=True)
class Context:
    sizes: Sizes
    base: Path  # the run's working directory; each scenario gets a folder of its own
    workers: int = 4
    quiet: bool = False

    def rig(self, scenario: str, options: DaemonOptions | None = None) -> Rig:
        options = options or DaemonOptions()
        return Rig(self.base / scenario, dataclasses.replace(options, workers=self.workers))

    def say(self, scenario: str, message: str) -> None:
        """Progress, on stderr (stdout may be the JSON)."""
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {scenario}: {message}", file=sys.stderr, flush=True)

    @staticmethod
    def setup_cap(n: int) -> float:
        """How long setting up `n` converged resources may take (not a figure; generous, for a slow daemon)."""
        return 60.0 + n / 50.0

    @staticmethod
    def measure_cap(n: int) -> float:
        """How long a measured convergence of `n` resources is waited for before it is reported unfinished."""
        return 30.0 + n / 300.0


async def put_files(rig: Rig, prefix: str, n: int, *, start: int = 0, content: str = "initial\n") -> dict[str, int]:
    """Put file resources `<prefix><start>` .. `<prefix><start + n - 1>` (in transactions); their desired
    revisions by name."""
    names = [f"{prefix}{i:06d}" for i in range(start, start + n)]
    by_key = await bulk(rig.db, [(rig.desired_key(name), file_resource(rig.files, name, content)) for name in names])
    return {name: by_key[rig.desired_key(name)] for name in names}
