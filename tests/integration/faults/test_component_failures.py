"""What an agent, etcd or a component throws at the daemon does not take it down uncleanly.

A bug in one agent's observation, or etcd refusing a write outright (say its
database is full), is logged and the daemon keeps serving every other key.
A component that does crash makes `run()` return 1 after a clean stop (HTTP
closed, `daemon.stopped` logged), never raise. An etcd blip while unfinished
plans are looked for at start-up is retried, not fatal.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from harness import Harness, eventually
from injection import fail_writes

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from plans import Resource
from reconciler.assembly import Assembly, assemble
from reconciler.keys import Section
from reconciler.logs import configure_logging
from reconciler.observer import Observer
from reconciler.store import EtcdStore, StoreError, StoreUnavailableError


class BrokenObservation(FileAgent):
    """The file agent, but observing one resource raises: an agent bug."""

    async def observe(self, desired: Resource):  # type: ignore[no-untyped-def]
        if desired.name == "bomb":
            raise RuntimeError("agent bug while observing")
        return await super().observe(desired)


async def test_an_agent_bug_in_observation_does_not_stop_the_daemon(harness: Harness) -> None:
    parts = assemble(harness.settings)
    agent = BrokenObservation(allowed_roots=harness.settings.agents.file.allowed_roots)
    agents = AgentRegistry([agent])
    harness.assembly = Assembly(
        agents=agents, tools=parts.tools, policies=parts.policies, poll_seconds=parts.poll_seconds
    )
    await harness.start()

    await harness.put_desired(harness.resource("bomb", "b\n"))
    revision = await harness.put_desired(harness.resource("fine", "f\n"))

    await harness.wait_status("fine", "Converged", revision=revision)
    await asyncio.sleep(1)  # several poll passes over the broken resource
    assert harness._task is not None and not harness._task.done(), "the daemon stopped"
    (harness.root / "fine").write_text("tampered\n")
    await eventually(lambda: _read(harness.root / "fine", "f\n"), what="the other file to be healed")
    assert await harness.stop() == 0


async def test_etcd_refusing_observation_writes_does_not_stop_the_daemon(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.start()
    await harness.put_desired(harness.resource("full", "f\n"))
    await harness.wait_status("full", "Converged")
    actual = harness.keys.section(Section.ACTUAL)
    faults = fail_writes(
        monkeypatch,
        lambda key, value: key.startswith(actual),
        times=5,
        error=lambda _: StoreError("etcd refused the request: RESOURCE_EXHAUSTED: mvcc: database space exceeded"),
    )

    (harness.root / "full").write_text("tampered\n")  # the poller's next write of actual/ is refused

    await eventually(lambda: _read(harness.root / "full", "f\n"), timeout=15, what="the file to be healed")
    assert faults.failed, "the injected refusal never happened"
    assert harness._task is not None and not harness._task.done(), "the daemon stopped"
    assert await harness.stop() == 0


async def test_a_crashed_component_stops_the_daemon_cleanly_with_exit_code_1(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def crash(self: Observer, **kwargs: object) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("observer bug")

    monkeypatch.setattr(Observer, "run", crash)
    configure_logging("info")
    daemon = await harness.start()
    port = daemon.http_port

    assert harness._task is not None
    code = await asyncio.wait_for(harness._task, 10)

    assert code == 1
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/healthz")
    err = capsys.readouterr()
    lines = [json.loads(line) for line in (err.out + err.err).splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "daemon.component_stopped" in events and events[-1] == "daemon.stopped", events


async def test_an_etcd_blip_while_looking_for_unfinished_plans_is_retried(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    status_prefix = harness.keys.section(Section.STATUS)
    real = EtcdStore.get_prefix
    failures: list[str] = []

    async def flaky(self: EtcdStore, prefix: str):  # type: ignore[no-untyped-def]
        if prefix == status_prefix and len(failures) < 2:
            failures.append(prefix)
            raise StoreUnavailableError("injected: etcd did not answer")
        return await real(self, prefix)

    monkeypatch.setattr(EtcdStore, "get_prefix", flaky)
    await harness.start()
    revision = await harness.put_desired(harness.resource("after-blip", "x\n"))

    await harness.wait_status("after-blip", "Converged", revision=revision)
    assert len(failures) == 2


async def _read(path, want: str) -> bool:  # type: ignore[no-untyped-def]
    return path.exists() and path.read_text() == want
