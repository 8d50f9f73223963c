"""An observation that never returns (a stat on a hung mount) costs that resource, not the daemon.

Observing is bounded by `reconciler.observe_timeout_seconds`: past it, the
poll pass goes on without that resource and its reconcile is retried later.
Start-up waits for a first observation of everything before any worker
starts; a stop during that wait still stops the daemon.
"""

from __future__ import annotations

import asyncio

from harness import Harness

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from plans import Resource
from policies import Policies
from reconciler.assembly import Assembly
from reconciler.daemon import Daemon
from tools import ToolRegistry


class HangingFiles(FileAgent):
    """The file agent, except that observing `stuck` never returns."""

    async def observe(self, desired: Resource):  # type: ignore[no-untyped-def]
        if desired.name == "stuck":
            await asyncio.Event().wait()
        return await super().observe(desired)


def _hanging(h: Harness, observe_timeout: float) -> None:
    reconciler = h.settings.reconciler.model_copy(
        update={"observe_timeout_seconds": observe_timeout, "shutdown_timeout_seconds": 2.0}
    )
    h.settings = h.settings.model_copy(update={"reconciler": reconciler})
    agents = AgentRegistry([HangingFiles(allowed_roots=[str(h.root)])])
    tools, policies = ToolRegistry(agents.tools()), Policies()
    h.assembly = Assembly(agents=agents, tools=tools, policies=policies, poll_seconds={"file": 0.2})


async def test_a_hung_observation_costs_its_resource_only(harness: Harness) -> None:
    _hanging(harness, observe_timeout=0.5)
    await harness.put_desired(harness.resource("stuck", "x\n"))
    await harness.put_desired(harness.resource("ok", "y\n"))

    await harness.start()

    await harness.wait_status("ok", "Converged")
    assert await harness.stop() == 0


async def test_a_stop_during_the_first_observation_pass_stops_the_daemon(harness: Harness) -> None:
    _hanging(harness, observe_timeout=3600)
    await harness.put_desired(harness.resource("stuck", "x\n"))
    stop = asyncio.Event()
    daemon = Daemon(harness.settings, assembly=harness.assembly)
    task = asyncio.create_task(daemon.run(stop))
    await asyncio.sleep(1.5)  # listed, recovered, now in the first observation pass

    stop.set()
    done, _ = await asyncio.wait({task}, timeout=10)

    assert done, "the daemon did not stop: start-up was waiting on the hung observation"
    assert task.result() == 0
