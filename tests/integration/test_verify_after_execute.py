"""Verify after execute: `Converged` only when the resource is seen to be as desired after its plan ran.

A tool that reports success and did nothing (here a `file.write` that never
writes, as a buggy third-party tool might) must leave the resource `Failed`
with the difference, not `Converged` on the tool's word.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import pytest
from pipeline import pipeline

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from plans import TemporaryError
from policies import Policies
from reconciler.assembly import Assembly
from reconciler.embedded import EmbeddedEtcd
from reconciler.outcome import Result
from reconciler.store import EtcdStore
from tools import Tool, ToolContext, ToolRegistry, ToolResult
from tools.builtin.files import FileWrite


class SaysItWrote(FileWrite):
    """Claims success and writes nothing."""

    name: ClassVar[str] = "file.write"

    async def execute(self, params: object, ctx: ToolContext) -> ToolResult:
        return ToolResult.success(written=True)


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


def _parts(root: Path, *, lying: bool) -> Assembly:
    agent = FileAgent(allowed_roots=[str(root)])
    tools: list[Tool] = [t for t in agent.tools() if t.name != "file.write" or not lying]
    if lying:
        tools.append(SaysItWrote(allowed_roots=[str(root)]))
    return Assembly(
        agents=AgentRegistry([agent]), tools=ToolRegistry(tools), policies=Policies(), poll_seconds={"file": 60}
    )


async def test_a_tool_that_claims_success_but_did_nothing_fails_the_plan(store: EtcdStore, tmp_path: Path) -> None:
    p = pipeline(store, tmp_path, parts=_parts(tmp_path, lying=True))
    await p.put(p.file("motd", "hello\n"))

    with pytest.raises(TemporaryError, match="did not converge"):
        await p.runtime.reconciler.reconcile(p.file("motd", "").key)

    status = await p.status("motd")
    assert status["phase"] == "Failed"
    assert status["message"].startswith("plan ran but the resource did not converge: file is missing")
    assert "file.write" in status["message"]
    record = await p.record(status["plan_id"])
    assert record["state"] == "failed"
    assert [step["state"] for step in record["steps"]] == ["succeeded"], "the tool's own word is journalled"
    assert record["verification"] == status["message"]
    assert not (tmp_path / "motd").exists()


async def test_a_plan_whose_effect_is_seen_converges_and_says_it_was_verified(
    store: EtcdStore, tmp_path: Path
) -> None:
    p = pipeline(store, tmp_path, parts=_parts(tmp_path, lying=False))
    await p.put(p.file("motd", "hello\n"))

    outcome = await p.runtime.reconciler.reconcile(p.file("motd", "").key)

    assert outcome.result is Result.CONVERGED
    status = await p.status("motd")
    assert status["phase"] == "Converged"
    record = await p.record(status["plan_id"])
    assert (record["state"], record["verification"]) == ("succeeded", "verified: actual matches desired")
    assert (tmp_path / "motd").read_text() == "hello\n"
