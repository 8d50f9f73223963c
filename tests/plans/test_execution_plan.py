"""ExecutionPlan: frozen; risk computed from its steps and never taken from its input; a content hash
that covers exactly what an approver approves (agent, resource, desired revision, steps)."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from plans import ExecutionPlan, ResourceKey, RiskLevel, Step

KEY = ResourceKey(kind="file", name="motd")


def write_step(*, content: str = "hello\n", risk: RiskLevel = RiskLevel.LOW) -> Step:
    return Step(
        tool="file.write",
        parameters={"path": "/srv/motd", "content": content, "mode": "0644"},
        description="write /srv/motd",
        risk=risk,
    )


def make_plan(*steps: Step, **fields: object) -> ExecutionPlan:
    values: dict[str, object] = {
        "agent": "file",
        "resource": KEY,
        "steps": steps,
        "reasoning": "content differs",
        "desired_revision": 7,
    }
    values.update(fields)
    return ExecutionPlan.model_validate(values)


def test_a_plan_is_frozen() -> None:
    plan = make_plan(write_step())
    with pytest.raises(ValidationError):
        plan.reasoning = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        plan.steps = ()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        plan.steps[0].risk = RiskLevel.CRITICAL  # type: ignore[misc]
    assert plan.reasoning == "content differs"
    assert plan.steps[0].risk is RiskLevel.LOW


def test_an_empty_plan_is_read_only() -> None:
    plan = make_plan()
    assert plan.is_empty
    assert plan.risk is RiskLevel.READ_ONLY


def test_risk_is_the_highest_step_risk() -> None:
    plan = make_plan(
        write_step(risk=RiskLevel.LOW),
        write_step(risk=RiskLevel.HIGH),
        write_step(risk=RiskLevel.MEDIUM),
    )
    assert plan.risk is RiskLevel.HIGH
    assert not plan.is_empty


@pytest.mark.parametrize("stated", ["read_only", "critical"])
def test_a_stated_risk_in_the_input_is_ignored_and_recomputed(stated: str) -> None:
    data = make_plan(write_step(risk=RiskLevel.MEDIUM)).model_dump(mode="json")
    data["risk"] = stated
    assert ExecutionPlan.model_validate(data).risk is RiskLevel.MEDIUM
    assert ExecutionPlan.model_validate_json(json.dumps(data)).risk is RiskLevel.MEDIUM

    empty = make_plan().model_dump(mode="json")
    empty["risk"] = stated
    assert ExecutionPlan.model_validate_json(json.dumps(empty)).risk is RiskLevel.READ_ONLY


def test_the_serialised_plan_carries_its_computed_risk() -> None:
    data = json.loads(make_plan(write_step(risk=RiskLevel.HIGH)).model_dump_json())
    assert data["risk"] == "high"


def test_json_round_trip_gives_an_equal_plan_with_the_same_hash() -> None:
    plan = make_plan(write_step(), write_step(content="bye\n", risk=RiskLevel.HIGH), planner="llm:small:x/y")
    back = ExecutionPlan.model_validate_json(plan.model_dump_json())
    assert back == plan
    assert back.risk is plan.risk
    assert back.content_hash() == plan.content_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"steps": (write_step(content="other\n"),)},
        {"steps": (write_step(risk=RiskLevel.HIGH),)},
        {"steps": (write_step(), write_step())},
        {"steps": ()},
        {"desired_revision": 8},
        {"agent": "other"},
        {"resource": ResourceKey(kind="file", name="issue")},
    ],
    ids=["content", "step-risk", "extra-step", "no-steps", "revision", "agent", "resource"],
)
def test_hash_changes_with_what_an_approver_approves(change: dict[str, object]) -> None:
    plan = make_plan(write_step())
    assert make_plan(write_step(), **change).content_hash() != plan.content_hash()


def test_hash_ignores_id_reasoning_and_planner() -> None:
    plan = make_plan(write_step(), id="aaaa-1", reasoning="one", planner="rules")
    other = make_plan(write_step(), id="bbbb-2", reasoning="two", planner="llm:large:p/m")
    assert plan != other
    assert other.content_hash() == plan.content_hash()


def test_hash_does_not_depend_on_parameter_order() -> None:
    forward = Step(tool="file.write", parameters={"path": "/srv/a", "content": "x"})
    backward = Step(tool="file.write", parameters={"content": "x", "path": "/srv/a"})
    assert make_plan(forward).content_hash() == make_plan(backward).content_hash()


def test_hash_is_sha256_of_the_canonical_json() -> None:
    # Approvals stored in etcd carry this hash, so its definition is part of the contract.
    plan = make_plan(write_step(content="héllo\n"))
    canonical = json.dumps(
        {
            "agent": "file",
            "resource": {"kind": "file", "name": "motd"},
            "desired_revision": 7,
            "steps": [
                {
                    "tool": "file.write",
                    "parameters": {"path": "/srv/motd", "content": "héllo\n", "mode": "0644"},
                    "description": "write /srv/motd",
                    "risk": "low",
                }
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert plan.content_hash() == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_new_plans_get_distinct_valid_ids() -> None:
    ids = {make_plan().id for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize("bad", [{"desired_revision": -1}, {"id": "Has/Slash"}, {"surprise": 1}])
def test_invalid_plan_fields_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make_plan(**bad)
