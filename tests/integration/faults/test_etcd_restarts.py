"""etcd SIGKILLed and restarted under a stream of desired writes (issue 3).

200 keys get 10,000 desired writes in all while the test's own etcd is
SIGKILLed and restarted 5 times mid-stream, on the same ports and data
directory. The real daemon runs in-process the whole time. Afterwards:

- every key's status is `Converged` with `observed_revision` equal to the
  mod_revision of the key's last write, and its file holds that write;
- no key is ever processed at a revision older than one already processed
  for it: the controller binds the desired `revision` and the `key` into
  every reconcile log line, and the sequence of revisions in a key's outcome
  lines (`reconcile.done` and its siblings) never decreases; nor does the
  `desired_revision` of the key's plan records, in the order they were made.

Resync is set far beyond the test's length, so convergence has to come from
the watch resuming where it stopped, not from a periodic re-enqueue.

A write whose outcome is unknown (etcd died with the request in flight) is
retried with the same value until it succeeds, and once all is over every key
is read back: the truth for "its last write" is what etcd holds, and it must
carry the value written last. CI runs the full size (about 10-15 s here);
`--soak` doubles the writes and the restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from harness import Harness, eventually, write_policies

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd, free_port
from reconciler.keys import KeySpace, Section
from reconciler.settings import Settings
from reconciler.store import EtcdStore, StoreError, StoreUnavailableError

PREFIX = "/restarts"
OUTCOMES = {"reconcile.done", "reconcile.retry", "reconcile.terminal", "reconcile.error"}


@dataclass
class LogCapture:
    """Every log event of the daemon, as dicts: structlog reconfigured to append instead of print."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        self.events.append(dict(event_dict))
        raise structlog.DropEvent

    def named(self, *names: str) -> Iterator[dict[str, Any]]:
        return (e for e in self.events if e["event"] in names)


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    # Not structlog.testing.capture_logs: it swaps the processors in a way that
    # loggers already bound inside a running daemon do not all see. This replaces
    # the whole configuration (info level, context variables merged) and puts it
    # back afterwards.
    capture = LogCapture()
    saved = structlog.get_config()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture
    finally:
        structlog.configure(**saved)


NO_LIMITS = {
    "limits": {"flap_max_plans": 1_000_000, "max_mutating_steps_per_minute": 1_000_000, "max_unhealthy_fraction": 1.0}
}


def settings_for(etcd: EmbeddedEtcd, root: Path, *, workers: int) -> Settings:
    return Settings.model_validate(
        {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": PREFIX, "request_timeout_seconds": 3},
            "watch": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5, "stall_seconds": 10},
            "http": {"listen": "127.0.0.1:0"},
            "reconciler": {
                "workers": workers,
                "resync_seconds": 3600,  # convergence must come from the watch, not a resync
                "backoff_base_seconds": 0.05,
                "backoff_max_seconds": 0.5,
                "rate_limit_per_second": 10_000,
            },
            # Every write is a legitimate desired change: the limits under test are elsewhere.
            "policies": {"file": write_policies(root.parent, NO_LIMITS)},
            "agents": {"file": {"allowed_roots": [str(root)], "poll_seconds": 5}},
        }
    )


def resource(root: Path, name: str, n: int) -> bytes:
    spec = {"path": str(root / name), "content": f"{name} write {n}\n"}
    return json.dumps({"kind": "file", "name": name, "spec": spec}).encode()


def schedule(names: list[str], per_key: int, rng: random.Random) -> list[tuple[str, int]]:
    """Every key's writes, interleaved, with the keys' last writes spread over the whole stream.

    If every key wrote until the end, each key's last write would come after the
    last restart and a watch that dropped events at a restart would go unnoticed.
    So each key ends at its own point, between a tenth of the way in and the end,
    and its writes are spread evenly up to there.
    """
    timed: list[tuple[float, int, str]] = []
    for name in names:
        end = rng.uniform(0.1, 1.0)
        timed += [(end * (n + 1) / per_key, n, name) for n in range(per_key)]
    return [(name, n) for _, n, name in sorted(timed)]


def kill_points(plan: list[tuple[str, int]], per_key: int, restarts: int) -> list[int]:
    """For each restart, a count of confirmed writes to kill at: just after some key's last write,
    near each 1/(restarts+1) of the stream, so writes that end a key sit right at every kill."""
    last_writes = [i for i, (_, n) in enumerate(plan) if n == per_key - 1]
    points = []
    for r in range(1, restarts + 1):
        near = len(plan) * r // (restarts + 1)
        points.append(min(last_writes, key=lambda i: abs(i - near)) + 1)
    return points


@dataclass
class Writers:
    """Writes a schedule with bounded concurrency, each key's writes in order, retrying each until etcd confirms it."""

    store: EtcdStore
    keys: KeySpace
    root: Path
    done: int = 0
    retried: int = 0
    last: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (write number, revision)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)  # set after every confirmed write

    async def put(self, name: str, n: int) -> None:
        key = self.keys.desired(ResourceKey(kind="file", name=name))
        value = resource(self.root, name, n)
        deadline = time.monotonic() + 60
        while True:
            try:
                revision = await self.store.put(key, value)
                break
            except (StoreUnavailableError, StoreError):
                # The put may or may not have landed; writing the same value again
                # is harmless, and the read-back at the end has the last word.
                self.retried += 1
                assert time.monotonic() < deadline, f"{name}: etcd did not take write {n} within 60 s"
                await asyncio.sleep(0.05)
        self.last[name] = (n, revision)
        self.done += 1
        self.progressed.set()

    async def run(self, plan: list[tuple[str, int]], *, concurrency: int) -> None:
        pending_writes = iter(plan)
        # asyncio.Lock wakes waiters in FIFO order, and a writer takes the next item and
        # queues on its key's lock without yielding in between: per-key order is kept.
        locks: dict[str, asyncio.Lock] = {}

        async def writer() -> None:
            for name, n in pending_writes:
                async with locks.setdefault(name, asyncio.Lock()):
                    await self.put(name, n)

        await asyncio.gather(*(writer() for _ in range(concurrency)))


async def restart_etcd_at(
    etcd: EmbeddedEtcd, writers: Writers, points: list[int], rng: random.Random
) -> list[tuple[int, float]]:
    """SIGKILL etcd once `writers.done` reaches each point and restart it after a short pause;
    for each restart, the writes confirmed when it was killed and the time it was back."""
    restarts: list[tuple[int, float]] = []
    for target in points:
        while writers.done < target:
            writers.progressed.clear()
            await writers.progressed.wait()
        etcd.kill()
        killed_at = writers.done
        await asyncio.sleep(rng.uniform(0.1, 0.6))
        await etcd.astart()
        restarts.append((killed_at, time.monotonic()))
    return restarts


async def read_plans(store: EtcdStore, keys: KeySpace) -> list[dict[str, Any]]:
    kvs, _ = await store.get_prefix(keys.section(Section.PLANS))
    return [json.loads(kv.value) for kv in kvs]


async def read_statuses(store: EtcdStore, keys: KeySpace) -> dict[str, dict[str, Any]]:
    kvs, _ = await store.get_prefix(keys.section(Section.STATUS) + "file/")
    return {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}


async def test_no_write_is_lost_or_processed_out_of_order_across_etcd_restarts(
    tmp_path: Path, soak: bool, captured_logs: LogCapture
) -> None:
    n_keys, n_writes, n_restarts = (200, 20_000, 10) if soak else (200, 10_000, 5)
    per_key = n_writes // n_keys
    rng = random.Random(3)
    etcd = EmbeddedEtcd(
        tmp_path / "etcd", client_port=free_port(), peer_port=free_port(), fast=True, log_path=tmp_path / "etcd.log"
    )
    etcd.start()
    root = tmp_path / "root"
    root.mkdir()
    names = [f"k{i:03d}" for i in range(n_keys)]
    keys = KeySpace(PREFIX)
    try:
        async with EtcdStore([etcd.endpoint], timeout=3) as store:
            h = Harness(store=store, keys=keys, root=root, settings=settings_for(etcd, root, workers=8))
            daemon = await h.start()
            writers = Writers(store=store, keys=keys, root=root)
            plan = schedule(names, per_key, rng)
            points = kill_points(plan, per_key, n_restarts)

            started = time.monotonic()
            chaos = asyncio.create_task(restart_etcd_at(etcd, writers, points, rng))
            await writers.run(plan, concurrency=32)
            written_in = time.monotonic() - started
            restarts = await chaos
            assert len(restarts) == n_restarts
            assert all(killed_at < len(plan) for killed_at, _ in restarts), "every kill came mid-stream"

            # The truth about each key's last write is what etcd holds now.
            final: dict[str, int] = {}
            for name in names:
                kv = await store.get(keys.desired(ResourceKey(kind="file", name=name)))
                assert kv is not None
                assert kv.value == resource(root, name, per_key - 1), f"{name}: etcd lost the last write"
                final[name] = kv.mod_revision
            moved = sum(1 for name in names if final[name] != writers.last[name][1])

            async def converged() -> bool:
                statuses = await read_statuses(store, keys)
                return all(
                    (s := statuses.get(name)) is not None
                    and s["phase"] == "Converged"
                    and s["observed_revision"] == final[name]
                    for name in names
                )

            try:
                await eventually(converged, timeout=60, what="every key converged at its last write")
            finally:
                statuses = await read_statuses(store, keys)
                behind = {
                    n: statuses.get(n) for n in names if (statuses.get(n) or {}).get("observed_revision") != final[n]
                }
                if behind:
                    print(f"\n{len(behind)} keys not at their last write (first 3): {list(behind.items())[:3]}")
            converged_at = time.monotonic()
            restarts_by_reason = {
                s.labels["reason"]: s.value
                for family in daemon.metrics.watch_restarts.collect()
                for s in family.samples
                if s.name.endswith("_total")
            }
            plans = await read_plans(store, keys)
            assert await h.stop() == 0
    finally:
        etcd.stop()

    assert restarts_by_reason.get("unavailable", 0) >= n_restarts, "every SIGKILL breaks the watch"
    for name in names:
        assert (root / name).read_text() == f"{name} write {per_key - 1}\n", f"{name}: file does not match"

    processed: dict[str, list[int]] = {}
    for event in captured_logs.named(*OUTCOMES):
        if event.get("revision") is not None:
            processed.setdefault(event["key"], []).append(event["revision"])
    assert set(processed) == {f"file/{name}" for name in names}
    for key, revisions in processed.items():
        regress = next((i for i in range(1, len(revisions)) if revisions[i] < revisions[i - 1]), None)
        assert regress is None, f"{key} processed at {revisions[regress]} after {revisions[regress - 1]}"

    by_key: dict[str, list[tuple[datetime, int]]] = {}
    for record in plans:
        resource_key = f"{record['plan']['resource']['kind']}/{record['plan']['resource']['name']}"
        made_at = datetime.fromisoformat(record["created_at"])
        by_key.setdefault(resource_key, []).append((made_at, record["plan"]["desired_revision"]))
    for key, made in by_key.items():
        in_order = [revision for _, revision in sorted(made)]
        assert in_order == sorted(in_order), f"{key}: a plan was made for an older revision than an earlier plan"

    outcomes = Counter(e["event"] for e in captured_logs.named(*OUTCOMES))
    results = Counter(e.get("result") for e in captured_logs.named("reconcile.done"))
    failures = Counter(e["event"] for e in captured_logs.events if e.get("level") in ("warning", "error"))
    print(
        f"\netcd restarts: {n_keys} keys, {writers.done} writes in {written_in:.1f} s"
        f" ({writers.done / written_in:.0f} writes/s with {n_restarts} SIGKILL+restarts),"
        f" {writers.retried} writes retried, {moved} keys whose last write landed at another revision than reported;"
        f" converged {converged_at - restarts[-1][1]:.1f} s after the last restart"
        f" ({converged_at - started - written_in:.1f} s after the last write);"
        f" reconciles {sum(outcomes.values())} {dict(outcomes)}, done by result {dict(results)};"
        f" plans {len(plans)}; watch restarts {restarts_by_reason}; warnings/errors {dict(failures)}"
    )
