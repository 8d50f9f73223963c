"""The journal stays writable whatever a tool returns: step outputs are capped, and say so."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from harness import Harness
from pydantic import BaseModel, ConfigDict

from agents import AgentRegistry
from plans import ExecutionPlan, Issue, RiskLevel, Snapshot, Step
from reconciler.assembly import Assembly, assemble
from tools import Tool, ToolContext, ToolRegistry, ToolResult


class DirParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str


class Emit(Tool):
    """Leaves a marker and returns about 2 MB of output, more than etcd takes in one request."""

    name: ClassVar[str] = "blob.emit"
    description: ClassVar[str] = "emit a huge output"
    parameters: ClassVar[type[BaseModel]] = DirParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = True

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, DirParams)
        (Path(params.dir) / "emitted").touch()
        return ToolResult.success(log="x" * 2_000_000, lines=40_000)


class BlobAgent:
    name = "blob"
    kinds = frozenset({"blob"})

    def tools(self) -> Sequence[Tool]:
        return [Emit()]

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        directory = str(snapshot.desired.spec["dir"])
        if (Path(directory) / "emitted").exists():
            return snapshot.plan(agent=self.name)
        return snapshot.plan(agent=self.name, steps=(Step(tool="blob.emit", parameters={"dir": directory}),))

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        raise AssertionError("not used")

    plan = reconcile


async def test_a_huge_step_output_is_cut_and_the_plan_converges(harness: Harness) -> None:
    parts = assemble(harness.settings)
    agents = AgentRegistry([BlobAgent()])
    harness.assembly = Assembly(
        agents=agents, tools=ToolRegistry(agents.tools()), policies=parts.policies, poll_seconds={}
    )
    await harness.start()

    await harness.store.put(
        harness.keys.desired(harness.daemon_key("big", kind="blob")),
        json.dumps({"kind": "blob", "name": "big", "spec": {"dir": str(harness.root)}}).encode(),
    )

    async def status() -> dict | None:
        kv = await harness.store.get(harness.keys.status(harness.daemon_key("big", kind="blob")))
        value = json.loads(kv.value) if kv else None
        return value if value and value["phase"] == "Converged" else None

    from harness import eventually

    converged = await eventually(status, what="blob/big to converge")
    record = await harness.plan_record(converged["plan_id"])
    step = record["steps"][0]
    assert step["state"] == "succeeded"
    assert step["output"]["truncated"] is True
    assert step["output"]["bytes"] > 2_000_000
    assert len(json.dumps(step["output"])) <= 4096
    assert "output cut" in step["message"]
