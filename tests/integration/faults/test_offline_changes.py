"""Changes made while the daemon is down, with etcd's history compacted away (issue 3).

The daemon converges a set of files and stops. While it is down, 500 keys are
written or deleted: existing resources get new content, others are deleted,
new ones appear, some are deleted and created again, and some are created and
deleted again before the daemon ever sees them. Then etcd is compacted to its
head, so no event of the gap can be replayed. The daemon starts again and
must converge everything, deletions included.

A deletion leaves no trace in the compacted key space; the daemon recovers it
from the `applied` value its status kept (README, "Deletion"). Deleting a
converged file is high risk, so the daemon here runs with
a policy file with `defaults: {high: auto}`, which lets it execute the deletions.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
from harness import Harness, write_policies

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace, Section
from reconciler.logs import configure_logging
from reconciler.settings import Settings
from reconciler.store import EtcdStore

PREFIX = "/offline"


@dataclass(frozen=True)
class Sizes:
    before: int = 400  # resources converged before the daemon stops
    # The offline changes (500 in all), by what happens to the key.
    changed: int = 180
    deleted: int = 150
    created: int = 100
    recreated: int = 40  # deleted, then created again with new content
    fleeting: int = 30  # created, then deleted again: the daemon never sees them

    def scaled(self, factor: int) -> Sizes:
        return Sizes(*(getattr(self, f.name) * factor for f in fields(self)))


def settings_for(etcd: EmbeddedEtcd, root: Path) -> Settings:
    return Settings.model_validate(
        {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": PREFIX},
            "watch": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5},
            "http": {"listen": "127.0.0.1:0"},
            "reconciler": {
                "workers": 16,
                "resync_seconds": 3600,  # convergence must come from the (re)list, not a resync
                "backoff_base_seconds": 0.05,
                "backoff_max_seconds": 0.5,
                "rate_limit_per_second": 5_000,
            },
            # Deletions (file.delete is high risk) are executed; several hundred legitimate changes at once:
            # the mutation budget under test is elsewhere.
            "policies": {"file": write_policies(root.parent, POLICIES)},
            "agents": {"file": {"allowed_roots": [str(root)], "poll_seconds": 5}},
        }
    )


POLICIES = {"defaults": {"high": "auto"}, "limits": {"max_mutating_steps_per_minute": 1_000_000}}


def resource(root: Path, name: str, content: str) -> bytes:
    return json.dumps({"kind": "file", "name": name, "spec": {"path": str(root / name), "content": content}}).encode()


async def wait_for(check: Callable[[], Awaitable[bool]], *, timeout: float, every: float, what: str) -> None:
    """Like harness.eventually, but polling less often: each check reads every status of a large key space,
    in the daemon's own event loop."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)


async def under(store: EtcdStore, keys: KeySpace, section: Section) -> dict[str, tuple[int, bytes]]:
    """name -> (mod_revision, value) of every file resource's key in `section`."""
    kvs, _ = await store.get_prefix(keys.section(section) + "file/")
    return {kv.key.decode().rsplit("/", 1)[1]: (kv.mod_revision, kv.value) for kv in kvs}


async def test_changes_made_while_the_daemon_was_down_converge_after_compaction(tmp_path: Path, soak: bool) -> None:
    factor = 4 if soak else 1
    size = Sizes().scaled(factor)
    configure_logging("warning")
    rng = random.Random(7)
    etcd = EmbeddedEtcd(tmp_path / "etcd", fast=True, log_path=tmp_path / "etcd.log")
    etcd.start()
    root = tmp_path / "root"
    root.mkdir()
    keys = KeySpace(PREFIX)
    desired = lambda name: keys.desired(ResourceKey(kind="file", name=name))  # noqa: E731
    pool = asyncio.Semaphore(32)

    async def put(name: str, content: str) -> int:
        async with pool:
            return await store.put(desired(name), resource(root, name, content))

    async def delete(name: str) -> None:
        async with pool:
            assert await store.delete(desired(name))

    try:
        async with EtcdStore([etcd.endpoint]) as store:
            h = Harness(store=store, keys=keys, root=root, settings=settings_for(etcd, root))

            # 1. Converge the first resources, then stop the daemon.
            existing = [f"r{i:05d}" for i in range(size.before)]
            revisions = dict(zip(existing, await asyncio.gather(*(put(n, f"{n} v1\n") for n in existing)), strict=True))
            await h.start()

            async def first_converged() -> bool:
                statuses = await under(store, keys, Section.STATUS)
                return all(n in statuses and json.loads(statuses[n][1])["phase"] == "Converged" for n in existing)

            await wait_for(first_converged, timeout=60 * factor, every=0.1 * factor, what="the first convergence")
            assert await h.stop() == 0

            # 2. Offline: 500 keys (2,000 with --soak) written or deleted, then the history compacted away.
            shuffled = rng.sample(existing, len(existing))
            changed = shuffled[: size.changed]
            deleted = shuffled[size.changed : size.changed + size.deleted]
            recreated = shuffled[size.changed + size.deleted : size.changed + size.deleted + size.recreated]
            untouched = shuffled[size.changed + size.deleted + size.recreated :]
            created = [f"n{i:05d}" for i in range(size.created)]
            fleeting = [f"f{i:05d}" for i in range(size.fleeting)]
            assert len(changed) + len(deleted) + len(recreated) + len(created) + len(fleeting) == 500 * factor

            revisions.update(zip(changed, await asyncio.gather(*(put(n, f"{n} v2\n") for n in changed)), strict=True))
            await asyncio.gather(*(delete(n) for n in deleted + recreated))
            await asyncio.gather(*(put(n, f"{n} v1\n") for n in fleeting))
            await asyncio.gather(*(delete(n) for n in fleeting))
            revisions.update(zip(created, await asyncio.gather(*(put(n, f"{n} v1\n") for n in created)), strict=True))
            revisions.update(
                zip(recreated, await asyncio.gather(*(put(n, f"{n} v3\n") for n in recreated)), strict=True)
            )
            head = await store.ping()
            await store.compact(head)

            # 3. Start again: everything converges from the list at the head and the statuses.
            started = time.monotonic()
            daemon = await h.start()
            ready_in = time.monotonic() - started
            expected = {n: f"{n} v1\n" for n in untouched + created} | {n: f"{n} v2\n" for n in changed}
            expected |= {n: f"{n} v3\n" for n in recreated}
            gone = deleted + fleeting

            async def converged() -> bool:
                statuses = await under(store, keys, Section.STATUS)
                actual = await under(store, keys, Section.ACTUAL)
                return all(
                    n in statuses
                    and json.loads(statuses[n][1])["phase"] == "Converged"
                    and json.loads(statuses[n][1])["observed_revision"] == revisions[n]
                    for n in expected
                ) and not any(n in statuses or n in actual for n in gone)

            try:
                await wait_for(
                    converged, timeout=60 * factor, every=0.1 * factor, what="every offline change converged"
                )
            finally:
                statuses = await under(store, keys, Section.STATUS)
                left = {n: json.loads(statuses[n][1]) for n in gone if n in statuses}
                if left:
                    print(f"\n{len(left)} deleted keys still have a status (first 3): {list(left.items())[:3]}")
            converged_in = time.monotonic() - started
            reconciles = {
                s.labels["result"]: s.value
                for family in daemon.metrics.reconciles.collect()
                for s in family.samples
                if s.name.endswith("_total")
            }
            assert await h.stop() == 0
    finally:
        etcd.stop()

    on_disk = {p.name: p.read_text() for p in root.iterdir()}
    assert on_disk == expected, {n: (on_disk.get(n), expected.get(n)) for n in set(on_disk) ^ set(expected)}
    statuses_seen: dict[str, Any] = {n: json.loads(v) for n, (_, v) in statuses.items()}
    for name in recreated:
        assert statuses_seen[name]["applied"]["spec"]["content"] == f"{name} v3\n"
    print(
        f"\noffline changes: {size.before} converged, then while down {size.changed} changed, {size.deleted} deleted,"
        f" {size.created} created, {size.recreated} deleted and re-created, {size.fleeting} created and deleted again;"
        f" compacted at {head}; after the restart ready in {ready_in:.2f} s, all converged in {converged_in:.1f} s;"
        f" reconciles by result {reconciles}"
    )
