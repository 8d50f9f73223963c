"""SIGTERM mid-plan: exit 0 within the drain timeout, no step left running (issue 3).

A real `setpoint run` process, against the session's real etcd, is given new
content for many files with large content, then SIGTERM at a seeded random
moment after its first plan started. With the default mutation budget (60
mutating steps a minute) part of the plans are writing and the rest are waiting
for a budget slot, so the signal always finds plans in flight. Each round
checks that the process exits 0 within `reconciler.shutdown_timeout_seconds`
(plus a small margin for process teardown), that no plan record is left
`executing` and no step `running`, that every status is `Converged` or
`Pending` (never `Executing`), that a `Converged` file holds the content of
the revision it claims, that a `Pending` status names an `interrupted` plan,
and that no temporary file of an abandoned write is left. After the last
round the daemon runs once more, unthrottled, and everything converges.

CI runs 3 rounds; `--soak` runs 25. A second test checks that the plans a
SIGTERM interrupted are carried out after a restart.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import write_policies

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace, Section
from reconciler.store import EtcdStore

SETPOINT = [sys.executable, "-m", "reconciler.cli"]
SHUTDOWN_TIMEOUT = 5.0
EXIT_MARGIN = 2.5  # interpreter and gRPC teardown after the drain
RESOURCES = 100
CONTENT_BYTES = 96 * 1024
SEED = 31337


def _config(path: Path, *, etcd: EmbeddedEtcd, prefix: str, root: Path, steps_per_minute: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix},
                "http": {"listen": "127.0.0.1:0"},
                "reconciler": {"workers": 8, "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT},
                "policies": {
                    "file": write_policies(path.parent, {"limits": {"max_mutating_steps_per_minute": steps_per_minute}})
                },
                "agents": {"file": {"allowed_roots": [str(root)], "poll_seconds": 0.2}},
                "log": {"level": "info"},
            }
        )
    )
    return path


async def _start(config: Path, log_path: Path) -> asyncio.subprocess.Process:
    with open(log_path, "wb") as log:  # noqa: ASYNC230
        return await asyncio.create_subprocess_exec(
            *SETPOINT, "run", "-c", str(config), stdout=log, stderr=asyncio.subprocess.STDOUT
        )


async def _wait_for_log(
    proc: asyncio.subprocess.Process, log_path: Path, event: str, *, count: int = 1, timeout: float = 30
) -> None:
    needle = f'"event": "{event}"'.encode()
    deadline = time.monotonic() + timeout
    while log_path.read_bytes().count(needle) < count:  # noqa: ASYNC240
        if proc.returncode is not None or time.monotonic() > deadline:
            tail = log_path.read_text()[-3000:]  # noqa: ASYNC240
            pytest.fail(f"daemon never logged {event} (exit {proc.returncode}): {tail}")
        await asyncio.sleep(0.01)


async def _sigterm(proc: asyncio.subprocess.Process) -> tuple[int | None, float]:
    """SIGTERM, then wait for the exit (killing after a generous bound); (exit code or None, seconds to exit)."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = await asyncio.wait_for(proc.wait(), timeout=SHUTDOWN_TIMEOUT + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        code = None
    return code, time.monotonic() - sent


def _events(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


async def _records(store: EtcdStore, keys: KeySpace) -> dict[str, dict[str, Any]]:
    kvs, _ = await store.get_prefix(keys.plan(""))
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


async def _statuses(store: EtcdStore, keys: KeySpace) -> dict[str, dict[str, Any]]:
    kvs, _ = await store.get_prefix(keys.section(Section.STATUS) + "file/")
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


def _check_records(records: dict[str, dict[str, Any]]) -> None:
    for plan_id, record in records.items():
        assert record["state"] != "executing", (plan_id, record["state"], record["message"])
        running = [step["index"] for step in record["steps"] if step["state"] == "running"]
        assert not running, f"plan {plan_id} left step(s) {running} running"


def _check_statuses(
    statuses: dict[str, dict[str, Any]],
    records: dict[str, dict[str, Any]],
    *,
    revisions: dict[str, int],
    contents: dict[str, str],
    root: Path,
) -> dict[str, int]:
    """Every status is Converged or Pending and tells the truth; returns how many keys are in which state."""
    seen = {"converged": 0, "pending": 0, "older": 0, "untouched": 0}
    for name in revisions:
        status = statuses.get(name)
        if status is None:
            seen["untouched"] += 1  # the shutdown came before a worker took this key
            continue
        assert status["phase"] in ("Converged", "Pending"), (name, status["phase"], status["message"])
        assert status["observed_revision"] <= revisions[name], (name, status)
        if status["phase"] == "Pending" and "budget" in status["message"]:
            pass  # never started: it was waiting for the mutating-steps budget when the shutdown came
        elif status["phase"] == "Pending":
            record = records.get(status["plan_id"])
            assert record is not None and record["state"] == "interrupted", (name, status, record and record["state"])
        if status["observed_revision"] < revisions[name]:
            seen["older"] += 1  # left by an earlier round; this round's shutdown came before a worker took it
        elif status["phase"] == "Converged":
            assert (root / name).read_bytes() == contents[name].encode(), f"{name} is Converged with other content"
            seen["converged"] += 1
        else:
            seen["pending"] += 1
    return seen


class Rounds:
    """One prefix, one root and one etcd client; each round gives every file new content, then runs the daemon."""

    def __init__(self, store: EtcdStore, etcd: EmbeddedEtcd, tmp_path: Path) -> None:
        self.store = store
        self.tmp_path = tmp_path
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.keys = KeySpace(f"/sd-{uuid.uuid4().hex[:8]}")
        # The default mutation budget (60 a minute): beyond it, plans wait for a slot when SIGTERM comes.
        self.throttled = _config(
            tmp_path / "throttled.yaml", etcd=etcd, prefix=self.keys.prefix, root=self.root, steps_per_minute=60
        )
        self.free = _config(
            tmp_path / "free.yaml", etcd=etcd, prefix=self.keys.prefix, root=self.root, steps_per_minute=100_000
        )
        self.names = [f"big-{i:03d}" for i in range(RESOURCES)]
        self.revisions: dict[str, int] = {}
        self.contents: dict[str, str] = {}

    async def new_content(self, label: str) -> None:
        self.contents = {n: f"{label} {n}\n" + "#" * CONTENT_BYTES for n in self.names}
        for n in self.names:
            doc = {"kind": "file", "name": n, "spec": {"path": str(self.root / n), "content": self.contents[n]}}
            key = self.keys.desired(ResourceKey(kind="file", name=n))
            self.revisions[n] = await self.store.put(key, json.dumps(doc).encode())

    async def run_and_sigterm(
        self, label: str, config: Path, *, after: str, count: int = 1, delay: float = 0.0
    ) -> float:
        """Start the daemon, SIGTERM it `delay` s after it logged `after` `count` times; the seconds it took to exit."""
        log_path = self.tmp_path / f"{label}.log"
        proc = await _start(config, log_path)
        try:
            await _wait_for_log(proc, log_path, after, count=count)
            await asyncio.sleep(delay)
            code, drain = await _sigterm(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        events = [e["event"] for e in _events(log_path)]
        assert code == 0, f"{label}: exit {code}; log tail: {log_path.read_text()[-3000:]}"
        assert drain <= SHUTDOWN_TIMEOUT + EXIT_MARGIN, f"{label}: took {drain:.2f} s to exit"
        assert "daemon.stopping" in events and "daemon.drain_timeout" not in events, label
        return drain

    async def check(self) -> tuple[dict[str, int], dict[str, int]]:
        """No plan executing, no step running, every status honest; (plans of this content by state, statuses)."""
        records = await _records(self.store, self.keys)
        _check_records(records)
        statuses = await _statuses(self.store, self.keys)
        seen = _check_statuses(statuses, records, revisions=self.revisions, contents=self.contents, root=self.root)
        leftovers = sorted(p.name for p in self.root.iterdir() if p.name not in self.revisions)
        assert not leftovers, f"an abandoned write left {leftovers[:5]}"
        plans: dict[str, int] = {}
        for record in records.values():
            if record["plan"]["desired_revision"] in self.revisions.values():
                plans[record["state"]] = plans.get(record["state"], 0) + 1
        return plans, seen


@pytest.mark.timeout(900)  # the --soak sizes outlast the suite-wide 120 s
async def test_sigterm_mid_plan_exits_zero_in_time_with_no_step_left_running(
    etcd: EmbeddedEtcd, tmp_path: Path, soak: bool
) -> None:
    rounds = 25 if soak else 3
    rng = random.Random(SEED)
    figures: list[str] = []
    async with EtcdStore([etcd.endpoint]) as store:
        run = Rounds(store, etcd, tmp_path)
        for r in range(rounds):
            await run.new_content(f"round {r}")
            delay = rng.uniform(0.0, 1.5)
            drain = await run.run_and_sigterm(f"round-{r}", run.throttled, after="plan.executing", delay=delay)
            plans, seen = await run.check()
            figures.append(
                f"round {r}: SIGTERM {delay:.2f} s after the first plan started, exit 0 in {drain:.2f} s; "
                f"plans {plans}; statuses {seen}"
            )
    print(
        f"\n{RESOURCES} files of {CONTENT_BYTES // 1024} KiB, shutdown_timeout_seconds {SHUTDOWN_TIMEOUT:g}\n"
        + "\n".join(figures)
    )


async def test_plans_interrupted_by_sigterm_are_carried_out_after_a_restart(etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    async with EtcdStore([etcd.endpoint]) as store:
        run = Rounds(store, etcd, tmp_path)
        await run.new_content("before the restart")
        # Once the budget's 60 writes are done, the other workers wait for a slot: SIGTERM interrupts them.
        await run.run_and_sigterm("interrupted", run.throttled, after="step.succeeded", count=60, delay=0.3)
        _, seen = await run.check()
        assert seen["pending"] > 0, f"no plan was interrupted, nothing to test: {seen}"

        log_path = tmp_path / "restart.log"
        proc = await _start(run.free, log_path)
        try:
            await _wait_for_log(proc, log_path, "daemon.ready")
            deadline = time.monotonic() + 30
            while True:
                statuses = await _statuses(store, run.keys)
                done = [n for n in run.names if (statuses.get(n) or {}).get("observed_revision") == run.revisions[n]
                        and statuses[n]["phase"] == "Converged"]  # fmt: skip
                if len(done) == len(run.names):
                    break
                assert proc.returncode is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, f"only {len(done)} of {len(run.names)} converged after the restart"
                await asyncio.sleep(0.2)
            missing = [n for n in run.names if not (run.root / n).exists()]
            assert not missing, f"{len(missing)} files are Converged but were never written, e.g. {missing[:3]}"
            await run.check()
            code, _ = await _sigterm(proc)
            assert code == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
