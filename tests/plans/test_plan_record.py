"""PlanRecord: the plan, its policy decision and per-step journal stored under `plans/<id>`."""

from __future__ import annotations

from datetime import UTC, datetime

from plans import ExecutionPlan, PlanRecord, PlanState, ResourceKey, RiskLevel, Step, StepRecord, StepState


def make_plan() -> ExecutionPlan:
    return ExecutionPlan(
        agent="file",
        resource=ResourceKey(kind="file", name="motd"),
        steps=(
            Step(tool="file.write", parameters={"path": "/srv/motd", "content": "x"}, risk=RiskLevel.LOW),
            Step(tool="file.delete", parameters={"path": "/srv/old"}, risk=RiskLevel.HIGH),
        ),
        reasoning="drift",
        desired_revision=3,
    )


def test_start_binds_the_hash_and_journals_every_step_as_pending() -> None:
    plan = make_plan()
    record = PlanRecord.start(plan, decision="approve", decision_reason="risk high")
    assert record.plan == plan
    assert record.plan_hash == plan.content_hash()
    assert (record.decision, record.decision_reason, record.state) == ("approve", "risk high", PlanState.PENDING)
    assert [(s.index, s.tool, s.state) for s in record.steps] == [
        (0, "file.write", StepState.PENDING),
        (1, "file.delete", StepState.PENDING),
    ]


def test_json_round_trip_gives_an_equal_record() -> None:
    record = PlanRecord.start(make_plan(), decision="auto")
    started = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    finished = datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC)
    record = record.model_copy(
        update={
            "state": PlanState.FAILED,
            "message": "step 2 failed",
            "steps": [
                StepRecord(
                    index=0,
                    tool="file.write",
                    state=StepState.SUCCEEDED,
                    started_at=started,
                    finished_at=finished,
                    output={"sha256": "ab", "nested": {"n": [1, 2.5, None, True]}},
                ),
                StepRecord(index=1, tool="file.delete", state=StepState.FAILED, message="permission denied"),
            ],
        }
    )
    back = PlanRecord.model_validate_json(record.model_dump_json())
    assert back == record
    assert back.plan.risk is RiskLevel.HIGH
    assert back.plan_hash == back.plan.content_hash()
