"""A runtime built to stand by keeps its cache warm and queues nothing until it leads; and of the runtimes the
daemon builds over its spells, only the latest hears the process agent (nothing of an ended term lingers)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.builtin.process import ProcessAgent
from plans import ResourceKey
from reconciler.assembly import assemble, build
from reconciler.cache import Cache
from reconciler.clock import SystemClock
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import Settings
from reconciler.store import EtcdStore
from tools import ToolContext
from tools.builtin.process import NameParams, ProcessStart
from tools.process_table import Launch

SLEEP = os.path.realpath("/usr/bin/sleep")


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _launch(name: str) -> Launch:
    return Launch(
        name=name, argv=(SLEEP, "300"), env={}, cwd="/", user=None, stop_signal=int(signal.SIGTERM),
        stop_timeout_seconds=5.0, start_seconds=0.0, log_max_bytes=1 << 20, log_backups=2, window_seconds=300.0,
    )  # fmt: skip


async def _exit_of(agent: ProcessAgent, name: str) -> None:
    """Start `name` under the agent's table and kill it; return once its exit has been reported."""
    agent.table.register(_launch(name))
    ctx = ToolContext(plan_id="p", resource=ResourceKey(kind="process", name=name), step_index=0)
    started = await ProcessStart(table=agent.table).execute(NameParams(name=name), ctx)
    pid = started.output["pid"]
    assert isinstance(pid, int) and agent.table.watching(name)
    os.kill(pid, signal.SIGKILL)
    while agent.table.watching(name):  # the watch goes just before the subscriber is told  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def test_a_standby_queues_nothing_and_only_the_latest_runtime_hears_the_process_agent(
    store: EtcdStore, tmp_path: Path
) -> None:
    settings = Settings.model_validate(
        {"agents": {"process": {"allowed_executables": [SLEEP], "state_dir": str(tmp_path / "state"),
                                "log_dir": str(tmp_path / "logs")}}}
    )  # fmt: skip
    parts = assemble(settings)
    agent = parts.agents.for_kind("process")
    assert isinstance(agent, ProcessAgent)
    keys = KeySpace(f"/standby-{uuid.uuid4().hex[:8]}")
    ended = build(settings, parts=parts, store=store, keys=keys, cache=Cache(keys), metrics=Metrics(),
                  clock=SystemClock())  # the leader's runtime of a term that ended  # fmt: skip
    standby = build(settings, parts=parts, store=store, keys=keys, cache=Cache(keys), metrics=Metrics(),
                    clock=SystemClock(), standby=True)  # fmt: skip
    file = ResourceKey(kind="file", name="a")
    value = {"kind": "file", "name": "a", "spec": {"path": str(tmp_path / "a"), "content": "a\n"}}
    await store.put(keys.desired(file), json.dumps(value).encode())
    reflector = asyncio.create_task(standby.reflector.run())
    try:
        await asyncio.wait_for(standby.reflector.synced.wait(), 10)
        assert file in standby.cache.desired, "the cache is warm"
        await _exit_of(agent, "napper")
        assert len(standby.queue) == 0, "a standby queues nothing"
        assert len(ended.queue) == 0, "the runtime of an ended term hears nothing"

        standby.lead()
        assert len(standby.queue) == 1, "leading queues every key"
        await _exit_of(agent, "dozer")
        assert len(standby.queue) == 2 and len(ended.queue) == 0, "the exit reaches the latest runtime only"
    finally:
        reflector.cancel()
        await asyncio.gather(reflector, return_exceptions=True)
        agent.close()
        for runtime in (ended, standby):
            await runtime.queue.shutdown()
