"""Evaluations: the recorded models, and every case in tests/evals replayed through the real planner."""

from __future__ import annotations

import pytest

from llm_router import Request, Tier, ToolSpec
from llm_router.interfaces import ChatMessage
from llm_router.replay import ReplayClock, ReplayProvider, Usage, replay_model

REQUEST = Request(
    messages=(ChatMessage(role="user", content="plan"),),
    tool=ToolSpec(name="submit_plan", description="d", parameters={"type": "object"}),
)


async def test_a_replay_answers_in_order_repeats_the_last_and_moves_its_clock_by_the_recorded_latency() -> None:
    clock = ReplayClock()
    first = {"reasoning": "a", "steps": []}
    usage = Usage(input=10, output=2, seconds=1.5)
    answers = [first, None, {"reasoning": "c", "steps": []}]
    replay = ReplayProvider(model="small", answers=answers, usage=usage, clock=clock)

    got = [await replay.ask(REQUEST, timeout=1) for _ in range(4)]

    assert [a.arguments["reasoning"] if a.arguments else None for a in got] == ["a", None, "c", "c"]
    assert got[1].problem == "the recorded model called no function"
    assert (got[0].input_tokens, got[0].output_tokens) == (10, 2)
    assert clock.now() == 6.0 and len(replay.requests) == 4
    assert replay.provider == "recorded"
    got[0].arguments["reasoning"] = "changed"  # type: ignore[index]
    assert first["reasoning"] == "a"


def test_a_replay_with_nothing_recorded_is_refused() -> None:
    with pytest.raises(ValueError, match="recorded/small: a replay needs at least one recorded answer"):
        ReplayProvider(model="small", answers=[])


def test_a_recorded_model_is_labelled_by_its_tier_and_priced_as_given() -> None:
    model = replay_model(Tier.LARGE, input_usd_per_mtok=15, output_usd_per_mtok=75)

    assert model.label == "recorded/large"
    assert model.cost(1_000_000, 1_000_000) == 90
