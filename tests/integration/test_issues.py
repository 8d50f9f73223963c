"""Issues in the running daemon: reported under issues/, healed once per report, listed in the status."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from harness import Harness, eventually
from pydantic import BaseModel, ConfigDict

from agents import AgentRegistry
from plans import ExecutionPlan, Issue, RiskLevel, Snapshot, Step
from policies import Policies, load_policies
from reconciler.assembly import Assembly
from reconciler.decisions import Submitted, decide
from tools import Tool, ToolContext, ToolRegistry, ToolResult

SLOW_POLL = 3600.0  # nothing but the issue can make the daemon look at the file


def slow_poll(harness: Harness) -> None:
    agents = harness.settings.agents.model_copy(
        update={"file": harness.settings.agents.file.model_copy(update={"poll_seconds": SLOW_POLL})}
    )
    harness.settings = harness.settings.model_copy(update={"agents": agents})


async def test_an_issue_on_a_drifted_file_heals_it_at_once(harness: Harness) -> None:
    slow_poll(harness)
    await harness.start()
    await harness.put_desired(harness.resource("motd", "hello\n"))
    converged = await harness.wait_status("motd", "Converged")
    (harness.root / "motd").write_text("tampered\n")
    await asyncio.sleep(0.3)
    assert (harness.root / "motd").read_text() == "tampered\n", "the slow poll must not have seen it"

    await harness.report_issue("motd", "a1", "motd is wrong", severity="critical")

    healed = await harness.wait_issue("motd", "a1", "healed")
    assert (harness.root / "motd").read_text() == "hello\n"
    assert healed["plan_id"] != converged["plan_id"]
    assert healed["summary"] == "motd is wrong" and healed["severity"] == "critical"
    record = await harness.plan_record(healed["plan_id"])
    assert [answer["id"] for answer in record["answers"]] == ["a1"]
    assert record["state"] == "succeeded"
    # The status is in etcd a moment before the daemon has counted it.
    await eventually(lambda: _heals(harness, "healed", 1.0), what="the heal to be counted")
    assert await harness.metric('setpoint_issues_open{kind="file",severity="critical"}') == 1.0


async def test_an_issue_with_nothing_to_repair_is_unhealable_once_per_report(harness: Harness) -> None:
    slow_poll(harness)
    await harness.start()
    await harness.put_desired(harness.resource("calm", "ok\n"))
    await harness.wait_status("calm", "Converged")

    await harness.report_issue("calm", "i1", "users say it is slow")
    unhealable = await harness.wait_issue("calm", "i1", "unhealable")
    assert unhealable["message"] == "no rule covers this issue: file matches the desired content and mode"
    status = await harness.status("calm")
    assert status is not None and status["phase"] == "Converged"
    assert "no rule" not in status["message"], "the message is the resource's own, not an issue's"

    # Another report on the same resource makes it look again: the first report is not healed twice.
    await harness.report_issue("calm", "i2", "second report")
    await harness.wait_issue("calm", "i2", "unhealable")
    await eventually(lambda: _heals(harness, "unhealable", 2.0), what="both reports to be counted")
    states = await harness.issue_states("calm")
    assert list(states) == ["i1", "i2"], "oldest first"
    assert states["i1"]["since"] == unhealable["since"], "the first report was not looked at again"

    # A changed value is a new report.
    await harness.report_issue("calm", "i1", "users say it is slow again")
    await eventually(lambda: _heals(harness, "unhealable", 3.0), what="the changed report to be looked at again")
    assert (await harness.issue_states("calm"))["i1"]["summary"] == "users say it is slow again"

    # A resolved issue leaves the status.
    await harness.resolve_issue("calm", "i1")

    async def gone() -> bool:
        return list(await harness.issue_states("calm")) == ["i2"]

    await eventually(gone, what="the resolved issue to leave the status")


async def _heals(harness: Harness, result: str, count: float) -> bool:
    return await harness.metric(f'setpoint_heals_total{{result="{result}"}}') == count


async def test_a_bad_issue_value_is_ignored_and_counted(running: Harness) -> None:
    await running.put_desired(running.resource("sturdy", "s\n"))
    await running.wait_status("sturdy", "Converged")
    key = running.keys.issue(running.daemon_key("sturdy"), "bad")
    await running.store.put(key, b"{not json")
    await running.store.put(running.keys.issue(running.daemon_key("sturdy"), "odd"), b'{"summary": 1}')

    async def counted() -> bool:
        return await running.metric("setpoint_invalid_issues_total") == 2.0

    await eventually(counted, what="both bad values to be counted")
    await running.report_issue("sturdy", "good", "a real one")
    await running.wait_issue("sturdy", "good", "unhealable")
    assert list(await running.issue_states("sturdy")) == ["good"]

    # A valid report overwritten by a bad value is withdrawn.
    await running.store.put(running.keys.issue(running.daemon_key("sturdy"), "good"), b"[]")

    async def withdrawn() -> bool:
        return await running.issue_states("sturdy") == {}

    await eventually(withdrawn, what="the unreadable report to leave the status")


async def test_a_heal_waits_for_approval_like_any_plan(harness: Harness) -> None:
    slow_poll(harness)
    path = harness.root / "guarded"
    path.write_text("right\n")
    path.chmod(0o644)
    harness.use_policies({"rules": [{"name": "writes-need-a-person", "match": {"tools": ["file.write"]},
                                     "action": "approve"}]})  # fmt: skip
    await harness.start()
    await harness.put_desired(harness.resource("guarded", "right\n"))
    await harness.wait_status("guarded", "Converged")  # no plan was needed
    path.write_text("wrong\n")

    await harness.report_issue("guarded", "al1", "guarded file changed")
    waiting = await harness.wait_issue("guarded", "al1", "awaiting_approval")
    assert path.read_text() == "wrong\n"
    record = await harness.plan_record(waiting["plan_id"])
    assert record["state"] == "awaiting_approval" and record["answers"][0]["id"] == "al1"

    result = await decide(
        harness.store, harness.keys, waiting["plan_id"], "approve", by="oncall", reason="ok", source="test"
    )
    assert isinstance(result, Submitted)
    healed = await harness.wait_issue("guarded", "al1", "healed")
    assert healed["plan_id"] == waiting["plan_id"]
    assert path.read_text() == "right\n"


async def test_the_flap_guard_covers_heals(harness: Harness) -> None:
    slow_poll(harness)
    harness.use_policies({"limits": {"flap_max_plans": 1, "flap_window_seconds": 600}})
    await harness.start()
    await harness.put_desired(harness.resource("flappy", "v\n"))
    await harness.wait_status("flappy", "Converged")  # one plan: the guard's allowance is used
    (harness.root / "flappy").write_text("x\n")

    await harness.report_issue("flappy", "f1", "flappy changed")
    blocked = await harness.wait_issue("flappy", "f1", "blocked")
    assert "flap" in blocked["message"]
    assert (harness.root / "flappy").read_text() == "x\n"
    status = await harness.status("flappy")
    assert status is not None and status["phase"] == "Blocked"


# -- an agent whose heal has a plan of its own ------------------------------------------------------


class RestartParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str


class Restart(Tool):
    name: ClassVar[str] = "svc.restart"
    description: ClassVar[str] = "Restart the service (here: count restarts in a file)."
    parameters: ClassVar[type[BaseModel]] = RestartParams
    risk: ClassVar[RiskLevel] = RiskLevel.LOW
    idempotent: ClassVar[bool] = False
    timeout_s: ClassVar[float] = 5.0

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        assert isinstance(params, RestartParams)
        log = Path(params.dir) / "restarts"
        log.write_text(log.read_text() + "restart\n" if log.exists() else "restart\n")
        return ToolResult.success()


class Wipe(Restart):
    name: ClassVar[str] = "svc.wipe"
    description: ClassVar[str] = "Wipe the service's data (critical: the default policy denies it)."
    risk: ClassVar[RiskLevel] = RiskLevel.CRITICAL


class ServiceAgent:
    """Nothing drifts; an issue about corruption is answered by a wipe, every other one by a restart."""

    name = "svc"
    kinds = frozenset({"svc"})

    def tools(self) -> Sequence[Tool]:
        return [Restart(), Wipe()]

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name, reasoning="nothing to compare")

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(agent=self.name)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        if issue.severity == "info":
            return snapshot.plan(agent=self.name, reasoning="info reports need nobody to act")
        tool = "svc.wipe" if "corrupt" in issue.summary else "svc.restart"
        step = Step(
            tool=tool, parameters={"dir": str(snapshot.desired.spec["dir"])}, description=tool, risk=RiskLevel.LOW
        )
        return snapshot.plan(agent=self.name, steps=[step], reasoning=f"restart: {issue.summary}")

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)


def service_assembly() -> Assembly:
    agents = AgentRegistry([ServiceAgent()])
    return Assembly(agents=agents, tools=ToolRegistry(agents.tools()), policies=Policies(), poll_seconds={})


async def _restarts(directory: Path) -> int:
    log = directory / "restarts"
    return len(log.read_text().splitlines()) if log.exists() else 0


async def test_each_open_issue_is_healed_once_oldest_first(harness: Harness, tmp_path: Path) -> None:
    harness.assembly = service_assembly()
    directory = tmp_path / "svc"
    directory.mkdir()
    value: dict[str, Any] = {"kind": "svc", "name": "web", "spec": {"dir": str(directory)}}
    await harness.put_desired(value)
    # Reported before the daemon starts: found by the initial list.
    await harness.report_issue("web", "old", "check failed", kind="svc")
    await harness.report_issue("web", "note", "for the record", kind="svc", severity="info")
    await harness.report_issue("web", "new", "latency high", kind="svc")
    await harness.start()

    for issue_id in ("old", "new"):
        await harness.wait_issue("web", issue_id, "healed", kind="svc")
    note = await harness.wait_issue("web", "note", "unhealable", kind="svc")
    assert note["message"] == "info reports need nobody to act"
    assert await _restarts(directory) == 2
    states = await harness.issue_states("web", kind="svc")
    assert list(states) == ["old", "note", "new"]
    old, new = states["old"], states["new"]
    assert old["plan_id"] != new["plan_id"]
    assert (await harness.plan_record(old["plan_id"]))["created_at"] < (await harness.plan_record(new["plan_id"]))[
        "created_at"
    ], "the oldest issue is healed first"

    # A restart of the daemon does not heal the same reports again.
    assert await harness.stop() == 0
    await harness.start()
    await harness.report_issue("web", "later", "check failed again", kind="svc")
    await harness.wait_issue("web", "later", "healed", kind="svc")
    assert await _restarts(directory) == 3


async def test_a_report_that_comes_after_the_repair_names_the_plan_that_made_it(running: Harness) -> None:
    await running.put_desired(running.resource("late", "right\n"))
    first = await running.wait_status("late", "Converged")
    broken_at = datetime.now(UTC)
    (running.root / "late").write_text("wrong\n")

    async def repaired() -> dict[str, Any] | None:
        status = await running.status("late")
        return status if status and status["plan_id"] != first["plan_id"] and status["phase"] == "Converged" else None

    repair = await eventually(repaired, what="the poll to repair the file")
    # The alert about it arrives now, saying when the problem began.
    await running.report_issue("late", "alert1", "late is wrong", details={"starts_at": broken_at.isoformat()})
    healed = await running.wait_issue("late", "alert1", "healed")
    assert healed["plan_id"] == repair["plan_id"]
    assert healed["message"] == f"repaired by plan {repair['plan_id']}, which began after the problem did"

    # A problem that began after the last plan is not that plan's: the agent is asked, and finds nothing.
    await running.report_issue("late", "later", "still odd", details={"reported_at": datetime.now(UTC).isoformat()})
    assert (await running.wait_issue("late", "later", "unhealable"))["plan_id"] is None


async def test_a_denied_heal_does_not_hold_back_the_issues_after_it(harness: Harness, tmp_path: Path) -> None:
    harness.assembly = service_assembly()
    directory = tmp_path / "svc"
    directory.mkdir()
    await harness.put_desired({"kind": "svc", "name": "db", "spec": {"dir": str(directory)}})
    await harness.start()
    await harness.report_issue("db", "old", "data looks corrupt", kind="svc")
    denied = await harness.wait_issue("db", "old", "blocked", kind="svc")
    assert "denied by policy" in denied["message"]
    status = await harness.status("db", "svc")
    assert status is not None and status["phase"] == "Blocked"

    await harness.report_issue("db", "new", "the service is down", kind="svc")
    await harness.wait_issue("db", "new", "healed", kind="svc")
    assert await _restarts(directory) == 1
    assert (await harness.issue_states("db", kind="svc"))["old"]["state"] == "blocked"


async def test_a_heal_whose_issue_is_resolved_before_anyone_decides_is_voided(harness: Harness, tmp_path: Path) -> None:
    harness.use_policies({"rules": [{"name": "restarts", "match": {"tools": ["svc.restart"]}, "action": "approve"}]})
    parts = service_assembly()
    harness.assembly = Assembly(
        agents=parts.agents, tools=parts.tools, poll_seconds={},
        policies=load_policies(harness.settings.policies.file, known_tools=["svc.restart", "svc.wipe"]),
    )  # fmt: skip
    directory = tmp_path / "svc"
    directory.mkdir()
    await harness.put_desired({"kind": "svc", "name": "web", "spec": {"dir": str(directory)}})
    await harness.start()
    await harness.report_issue("web", "blip", "a blip", kind="svc")
    waiting = await harness.wait_issue("web", "blip", "awaiting_approval", kind="svc")

    await harness.resolve_issue("web", "blip", kind="svc")

    async def voided() -> bool:
        return bool((await harness.plan_record(waiting["plan_id"]))["state"] == "voided")

    await eventually(voided, what="the waiting heal to be voided")
    record = await harness.plan_record(waiting["plan_id"])
    assert record["message"] == "the issues it answers were resolved before anyone decided"
    refused = await decide(harness.store, harness.keys, waiting["plan_id"], "approve", by="oncall", source="test")
    assert not isinstance(refused, Submitted) or refused.approval is None
    await asyncio.sleep(0.5)
    assert await _restarts(directory) == 0
    status = await harness.status("web", "svc")
    assert status is not None and status["phase"] == "Converged" and status["issues"] == []
