"""setpoint's engine against the physical limit (etcd on the same machine), in one run: issue 12's benchmark.

    python -m benchmarks.engine [--quick] [--only ingest,coalescing,...] [--workers 4] [--json PATH|-] [--keep]
    make bench                        # the full run (about 30 minutes on 2 cores)
    make bench BENCH_ARGS=--quick     # every scenario at tiny sizes, under 2 minutes

Each scenario starts its own etcd (data on the temporary directory's disk,
fsync on, as in production) and, except `ingest`, its own `setpoint run`
daemon process with 4 workers (`--workers`) and every limit that would hold
the engine back lifted: flap guard, mutation budget, max-unhealthy pause and
reconcile rate limit; everything else at its default (log level info, file
poll 10 s, resync 300 s). Load comes from this process through the client
the daemon uses itself (`benchmarks/load.py`), 64 puts in flight at most.
What the daemon does is read from outside, as an operator would: its status
keys in etcd (watched from here), `/metrics`, `/readyz` and `/proc`. A
scenario that fails is reported in its rows and the others still run (exit
code 1); a missed target is a result, not a failure. Figures that compare
are measured side by side in the same run: ratios are what to track, the
absolute values depend on the machine (printed first).

How each figure is measured:

- ingest: 20,000 desired puts (one revision each) are made with no daemon
  running. Then, alternately, twice each, best of two: `etcdctl watch --rev`
  from the first of them on the daemon's watch range, timed from its start
  until it has printed the last key; and the daemon's own reflector, cache
  and work queue (`reconciler/watch.py`, `cache.py`, `workqueue.py`), run in
  this process from the same revision (a daemon lists, then watches from
  the list's revision, so only the parts themselves can replay history),
  timed from its start until the queue has been given the last key. Figure:
  events/s each, and their ratio (target >= 0.9).
- coalescing: 1,000 file resources converged; then 100,000 puts over them
  (key i % 1,000, each a new content) as fast as etcd takes them. Figures:
  `setpoint_reconcile_total` run from the first put until the daemon is
  idle again (target <= 1,100), the time from the first put (and from the
  last) until every key's status is `Converged` at its last put's revision.
- latency: 10,000 file resources converged; then 300 changes/s for 60 s,
  open loop (change i due at i/300 s, whatever happened before), key after
  key, each a new content. A change's latency runs from just before its put
  is sent until this process receives the status `Converged` at that
  revision. A change whose key converged at a later revision first was
  coalesced (superseded), not lost. One still unanswered once the daemon is
  idle is lost; one still unanswered while the daemon is busy when the wait
  ends (60 s) counts in the percentiles with the time it had waited so far
  (so p99 is then a lower bound). Kept up: every change was answered within
  1 s of the last put. Targets: p99 <= 50 ms, none lost, kept up.
- throughput: 1,000 file resources converged; windows of 10 s of paced
  changes as in latency, at 50, 100, 200, ... changes/s until one fails,
  then 3 bisections. A rate holds when the generator kept its pace, every
  change was answered and p99 < 1 s. Figure: the highest rate that held and
  its ratio to etcd's put rate, measured in the same run by the same
  generator with the same concurrency, to keys outside the daemon's prefix.
- resync: 10,000 file resources converged, `reconciler.resync_seconds` 60
  (the file poll set to an hour, so the resync is all that runs). Once the
  daemon is idle, the pass starts at its `resync.began` log line's timestamp and
  ends when `setpoint_reconcile_total` has gone up by 10,000 since (read
  every 0.1 s); the daemon's CPU (user + system, `/proc/<pid>/stat`) over
  the same span. Target <= 2 s. Also the etcd revisions the pass wrote (target 0: a
  resync of converged keys writes nothing).
- cold start: 100,000 desired file resources in etcd before the daemon
  starts; the time from spawning `setpoint run` to `/readyz` 200 (polled
  every 20 ms; target <= 10 s) and to every status `Converged` at its
  revision.
- memory: the daemon's VmRSS 2 s after 10,000 resources converged, and
  again after 90,000 more were added and converged, or the wait for them
  ended (then the row below says how many had; target <= 150 MB, all
  converged).
- llm_flapping: one resource of a kind planned by the language model
  (`llm.kinds`), its model a fake OpenAI-compatible server
  (`benchmarks/fakellm.py`) answering every call with one read-only plan.
  Its actual state flips between matching and not matching desired every
  100 ms for 60 s. Figure: calls the fake server received (target 1: the
  rest from the plan cache), with `setpoint_llm_requests_total` and
  `setpoint_llm_plan_cache_hits_total` beside it.

Waits are capped, so a daemon far from the targets still finishes: what did
not converge in time is reported (None in the JSON, "-" in the table,
with the count that did). A measured convergence of n resources is waited
for 30 s + n / 300 s, `/readyz` at cold start 60 s + n / 250 s.

To profile the daemon of a scenario, attach to the pid its progress line
gives (stderr), e.g. `py-spy record --rate 200 --format speedscope -o
/tmp/x.json --pid <pid> --duration 20`; `--keep` keeps each daemon's log,
config and etcd data under the printed work directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import changes, state
from benchmarks.context import FULL, QUICK, Context, scaled
from benchmarks.figures import Figures, table
from reconciler.cli.run import event_loop_factory
from reconciler.embedded import etcd_version, find_etcd_binary
from reconciler.logs import configure_logging

Scenario = Callable[[Context, Figures], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "ingest": changes.ingest,
    "coalescing": changes.coalescing,
    "latency": changes.latency,
    "throughput": changes.throughput,
    "resync": state.resync,
    "cold_start": state.cold_start,
    "memory": state.memory,
    "llm_flapping": state.llm_flapping,
}
SCENARIO_CAP_SECONDS = 2400.0  # a scenario still running after this is stopped and reported as failed


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    binary = find_etcd_binary()
    return {
        "cpu": model, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "etcd": etcd_version(binary),
    }  # fmt: skip


async def run_scenario(name: str, ctx: Context, cap: float) -> Figures:
    out = Figures(name)
    started = time.perf_counter()
    ctx.say(name, "starting")
    limit = asyncio.timeout(cap)
    try:
        async with limit:
            await SCENARIOS[name](ctx, out)
    except Exception as e:  # the scenario's boundary: reported in its rows, the next one runs
        out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if limit.expired():
            out.error = f"stopped after {cap:g} s"
        out.details["traceback"] = traceback.format_exc()[-4000:]
    out.seconds = time.perf_counter() - started
    ctx.say(name, f"done in {out.seconds:.1f} s" + (f" - ERROR {out.error}" if out.error else ""))
    return out


async def run(names: list[str], ctx: Context, *, fail_fast: bool) -> list[Figures]:
    results = []
    for name in names:
        result = await run_scenario(name, ctx, SCENARIO_CAP_SECONDS)
        results.append(result)
        if result.error is not None and fail_fast:
            break
    return results


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and durations (under 2 minutes)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios (default: all)")
    parser.add_argument("--workers", type=int, default=4, help="reconciler.workers of each daemon (default 4)")
    parser.add_argument("--json", metavar="PATH", help="write the JSON result to PATH; '-': to stdout, the table "
                        "then goes to stderr")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, configs, data)")
    parser.add_argument("--keep-going", action="store_true", default=True,
                        help="run every scenario even after one fails (the default)")  # fmt: skip
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first scenario that fails")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)  # sizes times this (tests)
    args = parser.parse_args(argv)
    unknown = [name for name in args.only.split(",") if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.workers < 1 or args.scale <= 0:
        parser.error("--workers must be at least 1 and --scale above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # cleaned up like ^C: daemons and etcds stopped
    configure_logging("warning")  # the parts run here (ingest's reflector, the client) log to stderr
    names = [name for name in SCENARIOS if name in args.only.split(",")]
    sizes = scaled(QUICK if args.quick else FULL, args.scale)
    base = Path(tempfile.mkdtemp(prefix="setpoint-engine-bench-"))
    ctx = Context(sizes=sizes, base=base, workers=args.workers, quiet=args.quiet)
    command = "python -m benchmarks.engine " + " ".join(sys.argv[1:] if argv is None else argv)
    head = {"machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": command.strip(),
            "workers": args.workers, "sizes": sizes.__dict__}  # fmt: skip
    try:
        # On the daemon's own event loop (uvloop when installed), so ingest's in-process replay runs as it would.
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            results = runner.run(run(names, ctx, fail_fast=args.fail_fast))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    m = head["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, etcd {m['etcd']}",
        f"date: {head['date']}", f"command: {head['command']}", f"workers: {args.workers}",
        *([f"work dir (kept): {base}"] if args.keep else []), "", table(results),
    ]  # fmt: skip
    document = {**head, "scenarios": {result.scenario: result.as_json() for result in results}}
    text = json.dumps(document, indent=2)
    if args.json == "-":
        print("\n".join(lines), file=sys.stderr)
        print(text)
    else:
        print("\n".join(lines))
        if args.json:
            Path(args.json).write_text(text + "\n")
    return 1 if any(result.error is not None for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
