"""FileAgent: plans one `file.write` when the file drifts, nothing when it matches, a high-risk
`file.delete` on retire, and refuses an invalid spec with a message naming the field."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import JsonValue

from agents.builtin.file import FileAgent
from plans import ExecutionPlan, InvalidResourceError, Observed, Resource, RiskLevel, Snapshot
from tools import ToolContext, ToolRegistry, ToolStatus

REVISION = 41


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return Path(os.path.realpath(tmp_path / "root"))


@pytest.fixture
def agent(root: Path) -> FileAgent:
    return FileAgent(allowed_roots=[str(root)])


def desired(spec: dict[str, JsonValue]) -> Resource:
    return Resource(kind="file", name="motd", spec=spec)


def motd(root: Path, *, content: str = "hello\n", mode: str = "0644") -> Resource:
    return desired({"path": str(root / "motd"), "content": content, "mode": mode})


async def observe(agent: FileAgent, resource: Resource) -> Observed:
    state = await agent.observe(resource)
    return Observed(kind=resource.kind, name=resource.name, state=state, observed_at=datetime.now(UTC))


def snap(resource: Resource, actual: Observed | None, *, deleted: bool = False) -> Snapshot:
    return Snapshot(desired=resource, revision=REVISION, deleted=deleted, actual=actual)


def on_disk(root: Path, *, content: str, mode: int) -> None:
    (root / "motd").write_text(content)
    (root / "motd").chmod(mode)


def assert_one_write(plan: ExecutionPlan, root: Path, *, content: str = "hello\n", mode: str = "0644") -> None:
    assert len(plan.steps) == 1
    step = plan.steps[0]
    assert step.tool == "file.write"
    assert step.parameters == {"path": str(root / "motd"), "content": content, "mode": mode}
    assert step.risk is RiskLevel.LOW
    assert plan.risk is RiskLevel.LOW
    assert (plan.agent, str(plan.resource)) == ("file", "file/motd")
    assert plan.desired_revision == REVISION, "a plan names the desired revision it was made for"


async def test_a_missing_file_is_written(agent: FileAgent, root: Path) -> None:
    resource = motd(root)
    plan = await agent.reconcile(snap(resource, await observe(agent, resource)))
    assert_one_write(plan, root)
    assert "missing" in plan.reasoning


async def test_a_file_never_observed_is_written(agent: FileAgent, root: Path) -> None:
    assert_one_write(await agent.reconcile(snap(motd(root), None)), root)


async def test_a_file_with_different_content_is_rewritten(agent: FileAgent, root: Path) -> None:
    on_disk(root, content="stale\n", mode=0o644)
    resource = motd(root)
    plan = await agent.reconcile(snap(resource, await observe(agent, resource)))
    assert_one_write(plan, root)
    assert "content" in plan.reasoning


async def test_a_file_with_a_different_mode_is_rewritten(agent: FileAgent, root: Path) -> None:
    on_disk(root, content="hello\n", mode=0o600)
    resource = motd(root)
    plan = await agent.reconcile(snap(resource, await observe(agent, resource)))
    assert_one_write(plan, root)
    assert "0600" in plan.reasoning


@pytest.mark.parametrize("mode", ["0644", "644"])
async def test_a_matching_file_gets_an_empty_plan(agent: FileAgent, root: Path, mode: str) -> None:
    on_disk(root, content="hello\n", mode=0o644)
    resource = motd(root, mode=mode)
    plan = await agent.reconcile(snap(resource, await observe(agent, resource)))
    assert plan.is_empty
    assert plan.risk is RiskLevel.READ_ONLY


async def test_running_the_plan_converges(agent: FileAgent, root: Path) -> None:
    on_disk(root, content="stale\n", mode=0o666)
    resource = motd(root, content="fresh\n", mode="0640")
    plan = await agent.reconcile(snap(resource, await observe(agent, resource)))
    _, steps = ToolRegistry(agent.tools()).validate_plan(plan)
    for s in steps:
        ctx = ToolContext(plan_id=plan.id, resource=plan.resource, step_index=s.index)
        assert (await s.tool.execute(s.params, ctx)).status is ToolStatus.SUCCESS
    assert (await agent.reconcile(snap(resource, await observe(agent, resource)))).is_empty


INVALID_SPECS = [
    pytest.param({"path": "{root}/motd"}, "spec.content", id="missing-content"),
    pytest.param({"content": "x"}, "spec.path", id="missing-path"),
    pytest.param({"path": "{root}/motd", "content": "x", "owner": "root"}, "spec.owner", id="extra-field"),
    pytest.param({"path": "{root}/motd", "content": "x", "mode": "999"}, "spec.mode", id="bad-mode"),
    pytest.param({"path": "{root}/motd", "content": "x", "mode": 420}, "spec.mode", id="mode-int"),
    pytest.param({"path": "{root}/motd", "content": 123}, "spec.content", id="content-int"),
    pytest.param({"path": "{root}/../escape", "content": "x"}, "spec.path", id="outside-roots"),
    pytest.param({"path": "relative/motd", "content": "x"}, "spec.path", id="relative-path"),
]


@pytest.mark.parametrize(("spec", "field"), INVALID_SPECS)
async def test_an_invalid_spec_is_refused_naming_the_field(
    agent: FileAgent, root: Path, spec: dict[str, JsonValue], field: str
) -> None:
    spec = {k: v.format(root=root) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises(InvalidResourceError, match=field.replace(".", r"\.")):
        await agent.reconcile(snap(desired(spec), None))
    with pytest.raises(InvalidResourceError, match=field.replace(".", r"\.")):
        await agent.retire(snap(desired(spec), None, deleted=True))


async def test_retire_plans_a_high_risk_delete(agent: FileAgent, root: Path) -> None:
    on_disk(root, content="hello\n", mode=0o644)
    resource = motd(root)
    for actual in (None, await observe(agent, resource)):
        plan = await agent.retire(snap(resource, actual, deleted=True))
        assert [(s.tool, s.parameters) for s in plan.steps] == [("file.delete", {"path": str(root / "motd")})]
        assert plan.steps[0].risk is RiskLevel.HIGH
        assert plan.risk is RiskLevel.HIGH


async def test_retire_of_an_absent_file_is_an_empty_plan(agent: FileAgent, root: Path) -> None:
    resource = motd(root)
    actual = await observe(agent, resource)
    assert actual.state["exists"] is False
    plan = await agent.retire(snap(resource, actual, deleted=True))
    assert plan.is_empty
    assert plan.risk is RiskLevel.READ_ONLY


def test_a_valid_file_claims_its_normalised_path_and_an_invalid_one_claims_nothing(
    agent: FileAgent, root: Path
) -> None:
    assert agent.claims(desired({"path": f"{root}/app/../motd", "content": "x"})) == {f"file:{root}/motd"}
    for refused in ("relative/motd", str(root), f"{root}/.", f"{root}/../outside", "/elsewhere/motd"):
        assert agent.claims(desired({"path": refused, "content": "x"})) == frozenset(), refused
    assert agent.claims(desired({"path": f"{root}/motd", "content": "x", "mode": "999"})) == frozenset()


async def test_a_path_that_is_a_directory_is_invalid_instead_of_a_plan_that_always_fails(
    agent: FileAgent, root: Path
) -> None:
    (root / "motd").mkdir()

    with pytest.raises(InvalidResourceError, match=r"spec\.path: .*motd is a directory"):
        await agent.reconcile(snap(motd(root), None))


async def test_an_unquoted_mode_says_to_quote_it(agent: FileAgent, root: Path) -> None:
    """YAML reads an unquoted 0644 as the number 420: the message must say what to do."""
    with pytest.raises(InvalidResourceError, match=r'spec\.mode must be a quoted octal string such as "0644"'):
        await agent.reconcile(snap(desired({"path": str(root / "motd"), "content": "x", "mode": 420}), None))


async def test_observe_many_answers_each_as_observe_does(agent: FileAgent, root: Path) -> None:
    on_disk(root, content="hello\n", mode=0o600)
    present = motd(root)
    absent = Resource(kind="file", name="gone", spec={"path": str(root / "gone"), "content": "x"})
    outside = Resource(kind="file", name="etc", spec={"path": "/etc/passwd", "content": "x"})
    states = await agent.observe_many([present, outside, absent])
    assert states[0] == await agent.observe(present)
    assert isinstance(states[1], InvalidResourceError), "a resource observe refuses is that resource's answer"
    assert states[2] == await agent.observe(absent) == {"exists": False, "sha256": None, "mode": None}
