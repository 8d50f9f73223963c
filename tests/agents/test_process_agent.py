"""The process agent's validation and rules, from snapshots: what it plans for each observed state."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agents.builtin.process import CRASH_LOOP_ISSUE, ProcessAgent
from plans import GaveUp, InvalidResourceError, Issue, Observed, PlanningUnavailable, Resource, Snapshot, Step
from tools.process_table import GaveUpRecord, History

SLEEP = os.path.realpath("/usr/bin/sleep")
PYTHON = os.path.realpath(sys.executable)
NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(tmp_path: Path, clock: Clock) -> ProcessAgent:
    return ProcessAgent(
        allowed_executables=[SLEEP, PYTHON], state_dir=tmp_path / "state", log_dir=tmp_path / "logs", clock=clock
    )


def resource(name: str = "web", **spec: Any) -> Resource:
    return Resource(kind="process", name=name, spec={"command": ["sleep", "300"], **spec})


def snapshot(desired: Resource, state: dict[str, Any] | None, *, deleted: bool = False,
             issues: tuple[Issue, ...] = ()) -> Snapshot:  # fmt: skip
    actual = None
    if state is not None:
        actual = Observed(kind="process", name=desired.name, state=state, observed_at=datetime.now(UTC))
    return Snapshot(desired=desired, revision=7, deleted=deleted, actual=actual, issues=issues)


def stopped(**more: Any) -> dict[str, Any]:
    state = {"running": False, "pid": None, "started_at": "2024-01-01T00:00:00Z", "exit": {"code": 1, "signal": None},
             "restarts_in_window": 0, "command_hash": "abc"}  # fmt: skip
    return {**state, **more}


def running_state(agent: ProcessAgent, desired: Resource) -> dict[str, Any]:
    _, launch = agent.parse(desired)
    return {"running": True, "pid": 42, "started_at": "2024-01-01T00:00:00Z", "exit": None,
            "restarts_in_window": 0, "command_hash": launch.command_hash}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"command": []}, "spec.command: List should have at least 1 item"),
        ({"command": "sleep 300"}, "spec.command"),
        ({"command": ["sleep"], "shell": True}, "spec.shell is not a known field"),
        ({"command": ["sleep"], "cwd": "tmp"}, "spec.cwd: must be an absolute path"),
        ({"command": ["sleep"], "stop_signal": "NOPE"}, "spec.stop_signal: 'NOPE' is not a signal name"),
        ({"command": ["sleep"], "env": {"A=B": "c"}}, "spec.env"),
        ({"command": ["sleep"], "env": {"PATH": "/tmp/evil"}}, "PATH may not be set: it changes which code runs"),
        ({"command": ["sleep"], "env": {"LD_PRELOAD": "/tmp/x.so"}}, "LD_PRELOAD may not be set"),
        ({"command": ["sleep"], "env": {"PYTHONSTARTUP": "/tmp/x.py"}}, "PYTHONSTARTUP may not be set"),
        ({"command": ["sleep"], "env": {"BASH_ENV": "/tmp/x.sh"}}, "BASH_ENV may not be set"),
        ({"command": ["sleep"], "restart": {"base_seconds": 10, "cap_seconds": 1}}, "cap_seconds must not be"),
        ({"command": ["sleep"], "stop_timeout_seconds": "10"}, "spec.stop_timeout_seconds"),
        ({"command": ["rm", "-rf", "/"]}, "agents.process.allowed_executables"),
        ({"command": ["/nonexistent/bin/x"]}, "is not an executable file"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(agent: ProcessAgent, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidResourceError, match=message.replace("(", r"\(").replace("[", r"\[")):
        agent.validate(Resource(kind="process", name="web", spec=spec))


def test_user_is_refused_unless_the_daemon_runs_as_root(tmp_path: Path) -> None:
    not_root = ProcessAgent(allowed_executables=[SLEEP], state_dir=tmp_path, log_dir=tmp_path, running_as_root=False)
    with pytest.raises(InvalidResourceError, match=r"spec.user: the daemon runs as uid .*, not root"):
        not_root.validate(resource(user="nobody"))
    root = ProcessAgent(allowed_executables=[SLEEP], state_dir=tmp_path, log_dir=tmp_path, running_as_root=True)
    root.validate(resource(user="nobody"))
    with pytest.raises(InvalidResourceError, match="no user 'no-such-user-here'"):
        root.validate(resource(user="no-such-user-here"))


async def test_running_as_desired_plans_nothing(agent: ProcessAgent) -> None:
    desired = resource()
    plan = await agent.reconcile(snapshot(desired, running_state(agent, desired)))
    assert plan.is_empty and "runs as desired (pid 42)" in plan.reasoning


async def test_a_changed_command_or_env_restarts_it(agent: ProcessAgent) -> None:
    desired = resource()
    state = running_state(agent, desired)
    for changed in (resource(command=["sleep", "301"]), resource(env={"MODE": "fast"}), resource(cwd="/tmp")):
        plan = await agent.reconcile(snapshot(changed, state))
        assert [(s.tool, s.parameters, s.risk.value) for s in plan.steps] == [
            ("process.restart", {"name": "web"}, "medium")
        ]
    same = await agent.reconcile(snapshot(resource(stop_timeout_seconds=3, log={"backups": 1}), state))
    assert same.is_empty  # how it is stopped or logged is not what runs


async def test_not_running_starts_it(agent: ProcessAgent) -> None:
    plan = await agent.reconcile(snapshot(resource(), stopped()))
    assert [(s.tool, s.parameters, s.risk.value) for s in plan.steps] == [("process.start", {"name": "web"}, "low")]
    assert "exited (code 1)" in plan.reasoning
    never = await agent.reconcile(snapshot(resource(), stopped(started_at=None, exit=None)))
    assert "not started yet" in never.reasoning


async def test_restarts_back_off_exponentially_from_the_last_start(agent: ProcessAgent, clock: Clock) -> None:
    desired = resource(restart={"base_seconds": 1, "cap_seconds": 3})
    _, launch = agent.parse(desired)
    agent.table.update_history(launch, lambda h: h.model_copy(update={"restarts": [NOW - 10, NOW - 5, NOW - 1]}))
    with pytest.raises(PlanningUnavailable, match=r"exited \(code 1\); restarting in 2 s \(restart backoff after 3 "
                                                  r"restarts\)") as caught:  # fmt: skip
        await agent.reconcile(snapshot(desired, stopped()))
    assert caught.value.delay == pytest.approx(2.0)  # min(cap 3, 1 * 2^2) = 3 s after the last start
    clock.now = NOW + 2.5
    plan = await agent.reconcile(snapshot(desired, stopped()))
    assert plan.steps[0].tool == "process.start"


async def test_a_crash_loop_gives_up_with_an_issue_until_the_issue_is_resolved(
    agent: ProcessAgent, tmp_path: Path
) -> None:
    desired = resource(crash_loop={"max_restarts": 2, "window_seconds": 60})
    _, launch = agent.parse(desired)
    agent.table.update_history(launch, lambda h: h.model_copy(update={"restarts": [NOW - 30, NOW - 20]}))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "web.log").write_text("starting\nerror: port 8080 in use\n")
    with pytest.raises(GaveUp) as caught:
        await agent.reconcile(snapshot(desired, stopped()))
    error = caught.value
    assert "after 2 restarts within 60 s" in str(error) and "error: port 8080 in use" in str(error)
    assert error.issue_id == CRASH_LOOP_ISSUE and error.issue is not None
    assert error.issue.source == "process/web" and error.issue.severity == "warning"
    assert error.issue.details["log"] == ["starting", "error: port 8080 in use"]
    assert error.issue.details["restarts"] == 2

    issue = error.issue
    with pytest.raises(GaveUp):  # the issue is open: still given up, and now it has been seen
        await agent.reconcile(snapshot(desired, stopped(), issues=(issue,)))
    assert agent.table.history(launch).gave_up == GaveUpRecord(at=NOW, issue_seen=True)
    plan = await agent.reconcile(snapshot(desired, stopped()))  # resolved by an operator
    assert plan.steps[0].tool == "process.start" and "crash-loop issue was resolved" in plan.reasoning
    history = agent.table.history(launch)
    assert history.restarts == [] and history.gave_up is None


async def test_a_changed_spec_starts_over_after_giving_up(agent: ProcessAgent) -> None:
    desired = resource(crash_loop={"max_restarts": 1})
    _, launch = agent.parse(desired)
    agent.table.update_history(launch, lambda h: History(command_hash=h.command_hash, restarts=[NOW - 1],
                                                          gave_up=GaveUpRecord(at=NOW, issue_seen=True)))  # fmt: skip
    plan = await agent.reconcile(snapshot(resource(command=["sleep", "5"], crash_loop={"max_restarts": 1}), stopped()))
    assert plan.steps[0].tool == "process.start"


async def test_deleting_stops_it_when_it_runs(agent: ProcessAgent) -> None:
    desired = resource()
    plan = await agent.retire(snapshot(desired, running_state(agent, desired), deleted=True))
    assert [(s.tool, s.risk.value) for s in plan.steps] == [("process.stop", "medium")]
    gone = await agent.retire(snapshot(desired, stopped(), deleted=True))
    assert gone.is_empty


async def test_a_failing_http_check_restarts_it_and_other_issues_have_no_rule(agent: ProcessAgent) -> None:
    desired = resource()
    state = running_state(agent, desired)
    check = Issue(summary="GET http://127.0.0.1:8080/ answered 500", source="http_check/web-health")
    plan = await agent.heal(check, snapshot(desired, state, issues=(check,)))
    assert [(s.tool, s.parameters, s.risk.value) for s in plan.steps] == [
        ("process.restart", {"name": "web"}, "medium")
    ]
    other = Issue(summary="disk almost full", source="alertmanager")
    plan = await agent.heal(other, snapshot(desired, state, issues=(other,)))
    assert plan.is_empty and plan.reasoning.startswith("no rule covers this issue")


def test_a_models_steps_may_touch_only_this_process_and_never_stop_it() -> None:
    def why(tool: str, name: str) -> str | None:
        return ProcessAgent.in_scope(Step(tool=tool, parameters={"name": name}), name="web")

    assert why("process.restart", "web") is None
    assert why("process.logs", "web") is None
    assert why("process.restart", "db") is not None
    assert why("process.stop", "web") is not None
    assert why("file.write", "web") is not None


async def test_observing_adopts_a_running_process(agent: ProcessAgent, tmp_path: Path) -> None:
    """A process some earlier daemon started (its pidfile is all there is) is observed running and watched."""
    desired = resource()
    _, launch = agent.parse(desired)
    from tools.blocking import Commit

    started = agent.table.start(launch, started_by="earlier/0", commit=Commit())
    other = ProcessAgent(allowed_executables=[SLEEP], state_dir=tmp_path / "state", log_dir=tmp_path / "logs")
    try:
        state = await other.observe(desired)
        assert state["running"] is True and state["pid"] == started.pid
        assert state["command_hash"] == launch.command_hash
        assert other.table.watching("web")
        assert await other.observe(desired) == state  # stable between polls
    finally:
        os.killpg(started.pid, 9)
        other.close()


async def test_a_watched_process_is_polled_without_reading_its_files_but_its_log_is_still_rotated(
    agent: ProcessAgent, tmp_path: Path
) -> None:
    desired = resource(log={"max_bytes": 4096, "backups": 1})
    _, launch = agent.parse(desired)
    from tools.blocking import Commit

    started = agent.table.start(launch, started_by="p/0", commit=Commit())
    try:
        first = await agent.observe(desired)
        assert agent.table.watching("web")
        (tmp_path / "state" / "web.pid").unlink()  # not read again while the process is watched
        assert await agent.observe(desired) == first
        log = tmp_path / "logs" / "web.log"
        log.write_text("x" * 5000)
        agent.table.log_check_seconds = 0  # due at once
        await agent.observe(desired)
        assert log.stat().st_size == 0 and (tmp_path / "logs" / "web.log.1").stat().st_size == 5000
    finally:
        os.killpg(started.pid, 9)
        agent.close()
