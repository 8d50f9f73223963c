"""ToolRegistry.validate_plan: every step is checked against its tool before anything runs, errors name
the step and the parameter, and a step's risk is raised to its tool's declared risk."""

from __future__ import annotations

import pytest
from pydantic import JsonValue

from plans import ExecutionPlan, PlanValidationError, ResourceKey, RiskLevel, Step
from tools import ToolRegistry
from tools.builtin.files import FileDelete, WriteParams, file_tools

PATH = "/srv/setpoint/motd"


def make_plan(*steps: Step) -> ExecutionPlan:
    return ExecutionPlan(agent="file", resource=ResourceKey(kind="file", name="motd"), steps=steps, desired_revision=1)


def write(**parameters: JsonValue) -> Step:
    return Step(tool="file.write", parameters=parameters, risk=RiskLevel.LOW)


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry(file_tools(allowed_roots=["/srv/setpoint"]))


def test_a_valid_plan_binds_each_step_to_its_tool_and_parsed_parameters(registry: ToolRegistry) -> None:
    plan = make_plan(
        write(path=PATH, content="hi\n", mode="0600"),
        Step(tool="file.read", parameters={"path": PATH}),
    )
    validated_plan, validated = registry.validate_plan(plan)
    assert validated_plan == plan
    assert [(v.index, v.tool.name) for v in validated] == [(0, "file.write"), (1, "file.read")]
    assert validated[0].params == WriteParams(path=PATH, content="hi\n", mode="0600")
    assert validated[1].risk is RiskLevel.READ_ONLY


def test_omitted_optional_parameter_takes_its_default(registry: ToolRegistry) -> None:
    _, validated = registry.validate_plan(make_plan(write(path=PATH, content="")))
    assert isinstance(validated[0].params, WriteParams)
    assert validated[0].params.mode == "0644"


BAD_SECOND_STEPS = [
    pytest.param(Step(tool="file.chmod", parameters={"path": PATH}), "'file.chmod'", id="unknown-tool"),
    pytest.param(write(path=PATH), "parameter 'content' is required", id="missing"),
    pytest.param(write(path=PATH, content="x", owner="root"), "parameter 'owner' is not allowed", id="extra"),
    pytest.param(write(path=PATH, content=123), "parameter 'content'", id="content-int"),
    pytest.param(write(path=PATH, content="x", mode=644), "parameter 'mode'", id="mode-int"),
    pytest.param(write(path=PATH, content="x", mode="999"), "parameter 'mode'", id="mode-not-octal"),
    pytest.param(write(path=None, content="x"), "parameter 'path'", id="path-null"),
    pytest.param(Step(tool="file.delete", parameters={"path": ["/a"]}), "parameter 'path'", id="path-list"),
]


@pytest.mark.parametrize(("bad", "names"), BAD_SECOND_STEPS)
def test_a_bad_step_fails_the_whole_plan_naming_the_step_and_parameter(
    registry: ToolRegistry, bad: Step, names: str
) -> None:
    plan = make_plan(write(path=PATH, content="fine\n"), bad, write(path=PATH, content="also fine\n"))
    with pytest.raises(PlanValidationError) as caught:
        registry.validate_plan(plan)
    message = str(caught.value)
    assert message.startswith("step 2")
    assert names in message
    assert "step 1" not in message and "step 3" not in message


def test_an_understated_risk_is_raised_to_the_tools_declared_risk(registry: ToolRegistry) -> None:
    plan = make_plan(
        Step(tool="file.read", parameters={"path": PATH}, risk=RiskLevel.READ_ONLY),
        Step(tool="file.delete", parameters={"path": PATH}, risk=RiskLevel.READ_ONLY),
    )
    validated_plan, validated = registry.validate_plan(plan)
    assert [s.risk for s in validated_plan.steps] == [RiskLevel.READ_ONLY, FileDelete.risk]
    assert validated_plan.risk is RiskLevel.HIGH
    assert [v.risk for v in validated] == [RiskLevel.READ_ONLY, RiskLevel.HIGH]
    assert validated[1].step is validated_plan.steps[1]
    # The planner's plan is left as it was, and the plan id is kept.
    assert plan.risk is RiskLevel.READ_ONLY
    assert validated_plan.id == plan.id


def test_an_overstated_risk_is_kept(registry: ToolRegistry) -> None:
    plan = make_plan(Step(tool="file.read", parameters={"path": PATH}, risk=RiskLevel.CRITICAL))
    validated_plan, validated = registry.validate_plan(plan)
    assert validated_plan.steps[0].risk is RiskLevel.CRITICAL
    assert validated_plan.risk is RiskLevel.CRITICAL
    assert validated[0].risk is RiskLevel.CRITICAL


def test_a_tool_name_can_be_registered_only_once(registry: ToolRegistry) -> None:
    with pytest.raises(ValueError, match=r"file\.write"):
        registry.register(file_tools(allowed_roots=["/srv"])[0])
