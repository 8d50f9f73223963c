"""The etcd member a daemon's watch talks to is SIGKILLed during a stream of 2,000 desired writes (issue 11).

A real 3-member etcd cluster on loopback; the daemon runs in-process with all
three endpoints given by host name (`localhost:PORT`) and one agent whose
only tool counts its calls: it writes a resource's content to its file and
records the desired revision it was planned for. 100 keys get 20 writes each,
interleaved, with each key's last write at its own point of the stream. Once
a third of the writes are confirmed, the member serving the daemon's watch
(as the members' own metrics say, and the daemon's `watch.connected` log) is
killed and stays dead: the daemon carries on with the two left. Both cases
run: the member is a follower (failover alone), or it was made the leader
first (failover and an election at once, where a write a follower forwarded
to the dying leader is lost and answered only after etcd's 5 s timeout).

Afterwards every key is `Converged` at the revision of its last write, which
its file holds; the watch resumed on another member from its revision (no
relist), and the tool never ran twice for one desired revision of a key, nor
for an older revision after a newer one.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
from cluster import EtcdCluster, wait_for_leader
from harness import Harness, eventually, write_policies
from pydantic import BaseModel, ConfigDict
from test_etcd_restarts import NO_LIMITS, LogCapture, captured_logs, schedule  # noqa: F401  (fixture)

from agents import AgentRegistry
from plans import ExecutionPlan, Issue, ResourceKey, RiskLevel, Snapshot, Step
from policies import load_policies
from reconciler.assembly import Assembly
from reconciler.keys import KeySpace, Section
from reconciler.settings import Settings
from reconciler.store import EtcdStore, StoreError, StoreUnavailableError
from tools import Tool, ToolContext, ToolRegistry, ToolResult

PREFIX = "/member-loss"
N_KEYS, PER_KEY = 100, 20


class WriteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    content: str
    revision: int


class CountedWrite(Tool):
    """Writes `content` to `path` and records (resource name, desired revision) of every call."""

    name: ClassVar[str] = "count.write"
    description: ClassVar[str] = "write a file, counting the call"
    parameters: ClassVar[type[BaseModel]] = WriteParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True
    timeout_s: ClassVar[float] = 10.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, WriteParams)
        self.calls.append((ctx.resource.name, params.revision))
        _write(Path(params.path), params.content)
        return ToolResult.success()


def _write(path: Path, content: str) -> None:
    path.write_text(content)


def _holds(path: Path, content: str) -> bool:
    return path.exists() and path.read_text() == content


class CountAgent:
    """Kind `count`, spec `{"path", "content"}`: one counted write whenever the file differs from the content."""

    name = "count"
    kinds = frozenset({"count"})

    def __init__(self, tool: CountedWrite) -> None:
        self._tools: list[Tool] = [tool]

    def tools(self) -> Sequence[Tool]:
        return self._tools

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        path, content = Path(str(snapshot.desired.spec["path"])), str(snapshot.desired.spec["content"])
        if _holds(path, content):
            return snapshot.plan(agent=self.name)
        params = {"path": str(path), "content": content, "revision": snapshot.revision}
        step = Step(tool=CountedWrite.name, parameters=params, description="write", risk=RiskLevel.LOW)
        return snapshot.plan(agent=self.name, steps=[step])

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)


def settings_for(cluster: EtcdCluster, root: Path) -> Settings:
    return Settings.model_validate(
        {
            "etcd": {"endpoints": cluster.host_endpoints, "prefix": PREFIX},
            "watch": {"backoff_base_seconds": 0.05, "backoff_max_seconds": 0.5, "stall_seconds": 10},
            "http": {"listen": "127.0.0.1:0"},
            "reconciler": {
                "workers": 8,
                "resync_seconds": 3600,  # convergence must come from the watch, not a resync
                "backoff_base_seconds": 0.05,
                "backoff_max_seconds": 0.5,
                "rate_limit_per_second": 10_000,
            },
            "policies": {"file": write_policies(root.parent, NO_LIMITS)},
        }
    )


def value(root: Path, name: str, n: int) -> bytes:
    return json.dumps({"kind": "count", "name": name, "spec": {"path": str(root / name), "content": f"{n}"}}).encode()


async def write_all(
    store: EtcdStore, keys: KeySpace, root: Path, plan: list[tuple[str, int]], *, third: asyncio.Event
) -> int:
    """Write `plan`, each key's writes in order, 16 at a time, each retried until etcd confirms it; `third` is
    set once a third are confirmed. How many writes were retried."""
    pending = iter(plan)
    done = 0
    locks: dict[str, asyncio.Lock] = {}
    retried = 0

    async def writer() -> None:
        nonlocal retried, done
        for name, n in pending:
            async with locks.setdefault(name, asyncio.Lock()):
                while True:
                    try:
                        await store.put(keys.desired(ResourceKey(kind="count", name=name)), value(root, name, n))
                        break
                    except (StoreUnavailableError, StoreError):
                        retried += 1  # it may have landed; the same value again is harmless
                        await asyncio.sleep(0.05)
                done += 1
                if done == len(plan) // 3:
                    third.set()

    await asyncio.gather(*(writer() for _ in range(16)))
    return retried


@pytest.mark.parametrize("role", ["follower", "leader"])
async def test_killing_the_watched_member_mid_stream_loses_nothing_and_repeats_nothing(
    etcd_cluster: EtcdCluster,
    tmp_path: Path,
    captured_logs: LogCapture,  # noqa: F811
    role: str,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    keys = KeySpace(PREFIX)
    names = [f"k{i:03d}" for i in range(N_KEYS)]
    tool = CountedWrite()
    settings = settings_for(etcd_cluster, root)
    agents = AgentRegistry([CountAgent(tool)])
    policies = load_policies(settings.policies.file)
    assembly = Assembly(agents=agents, tools=ToolRegistry(agents.tools()), policies=policies, poll_seconds={})
    watch_start = keys.section(Section.ACTUAL)

    def reflector_members() -> list[str]:
        """The endpoint of every watch the reflector opened, in order, by the daemon's log."""
        return [e["endpoint"] for e in captured_logs.named("watch.connected") if e.get("key") == watch_start]

    async def watches(at_least: int) -> list[str] | None:
        found = reflector_members()
        return found if len(found) >= at_least else None

    async with EtcdStore(etcd_cluster.host_endpoints) as store:
        h = Harness(store=store, keys=keys, root=root, settings=settings, assembly=assembly)
        daemon = await h.start()
        try:
            first = await eventually(lambda: watches(1), what="the watch to start")
            victim = next(m for m in etcd_cluster.members if f"localhost:{m.client_port}" == first[0])
            assert victim in await asyncio.to_thread(etcd_cluster.watched), "the member the log names serves a watch"
            # The leadership is where the case wants it: on the victim, or on another member.
            leader = await wait_for_leader(etcd_cluster)
            if (leader is victim) != (role == "leader"):
                to = victim if role == "leader" else next(m for m in etcd_cluster.members if m is not victim)
                await asyncio.to_thread(etcd_cluster.move_leader, to)
            assert (await wait_for_leader(etcd_cluster) is victim) == (role == "leader")

            plan = schedule(names, PER_KEY, random.Random(11))
            third = asyncio.Event()
            started = time.monotonic()
            writing = asyncio.create_task(write_all(store, keys, root, plan, third=third))
            await third.wait()
            victim.kill()
            killed_at = time.monotonic()
            await eventually(lambda: watches(2), what="the watch on another member")
            moved_after = time.monotonic() - killed_at
            retried = await writing
            written_in = time.monotonic() - started

            final: dict[str, int] = {}
            for name in names:
                kv = await store.get(keys.desired(ResourceKey(kind="count", name=name)))
                assert kv is not None, f"{name}: etcd lost the key"
                assert kv.value == value(root, name, PER_KEY - 1), f"{name}: etcd lost the last write"
                final[name] = kv.mod_revision

            async def converged() -> bool:
                kvs, _ = await store.get_prefix(keys.section(Section.STATUS) + "count/")
                statuses = {kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}
                return all(
                    (s := statuses.get(name)) is not None
                    and s["phase"] == "Converged"
                    and s["observed_revision"] == final[name]
                    for name in names
                )

            await eventually(converged, timeout=60, what="every key converged at its last write")
            converged_after = time.monotonic() - killed_at
            restarts = {
                s.labels["reason"]: s.value
                for family in daemon.metrics.watch_restarts.collect()
                for s in family.samples
                if s.name.endswith("_total")
            }
        finally:
            stopped = await h.stop()
    assert stopped == 0

    moved_to = reflector_members()[1:]
    assert moved_to and all(e != first[0] for e in moved_to), f"the watch came back on the dead member: {moved_to}"
    assert "compacted" not in restarts, "the watch resumed from its revision, without a relist"
    assert len(list(captured_logs.named("watch.listed"))) == 1, "the cache was listed once, at start"
    for name in names:
        assert (root / name).read_text() == f"{PER_KEY - 1}", f"{name}: the file does not hold the last write"

    twice = [call for call, count in Counter(tool.calls).items() if count > 1]
    assert not twice, f"the tool ran more than once for one desired revision: {twice[:5]}"
    by_key: dict[str, list[int]] = {}
    for name, revision in tool.calls:
        by_key.setdefault(name, []).append(revision)
    for name, revisions in by_key.items():
        assert revisions == sorted(revisions), f"{name}: an older revision was processed after a newer one"

    failures = Counter(e["event"] for e in captured_logs.events if e.get("level") in ("warning", "error"))
    print(
        f"\nmember loss ({role}): {len(plan)} writes in {written_in:.1f} s, the watched member killed after"
        f" {len(plan) // 3}; watch on {moved_to[0]} {moved_after * 1000:.0f} ms after the kill; every key converged"
        f" {converged_after:.1f} s after the kill; {len(tool.calls)} tool calls for {len(final)} keys;"
        f" {retried} writes retried; watch restarts {restarts}; warnings/errors {dict(failures)}"
    )
