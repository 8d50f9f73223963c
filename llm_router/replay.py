"""Recorded models: a `ChatProvider` that answers from a recording, so evaluations run offline.

`setpoint llm eval` replays each case's recorded `submit_plan` arguments
(`tests/evals/NN_name/answers.yaml`) through the real router, planner and
validation: a `ReplayProvider` per tier gives back the recorded answers in
the order a solve asks for them (the first answer, then the repair turn's,
and so on) and, once they run out, repeats the last one. A `None` entry is
a model that called no function.

Token usage is the recording's, per call, so costs are what the recorded
model would have cost at the configured prices. Latency is the recording's
too: a `ReplayClock` handed to the router as its `now` moves forward by the
recorded seconds of each call and by nothing else, so a replay reports the
same latency on every machine.

The model behind a replay is labelled `recorded/<tier>`: `replay_model`
builds its `ModelConfig`. "recorded" is deliberately not a provider a
settings file may name, so that config is built without validation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from llm_router.config import ModelConfig
from llm_router.interfaces import Answer, Request, Tier

RECORDED = "recorded"


class Usage(BaseModel):
    """What one recorded call used: tokens in and out, and how long it took."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: int = Field(default=0, ge=0, description="Input tokens per call. Defaults to 0.")
    output: int = Field(default=0, ge=0, description="Output tokens per call. Defaults to 0.")
    seconds: float = Field(default=0.0, ge=0, description="Latency per call. Defaults to 0 s.")


class ReplayClock:
    """A monotonic clock that moves only when told: by the recorded latency of each replayed call."""

    def __init__(self) -> None:
        self._now = 0.0

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


class ReplayProvider:
    """Answers each request with the next recorded `submit_plan` arguments; the last one once they run out.

    `usage` defaults to no tokens and no latency; `clock`, when given, is advanced by `usage.seconds` per call.
    """

    def __init__(
        self,
        *,
        provider: str = RECORDED,
        model: str,
        answers: Sequence[dict[str, JsonValue] | None],
        usage: Usage | None = None,
        clock: ReplayClock | None = None,
    ) -> None:
        if not answers:
            raise ValueError(f"{provider}/{model}: a replay needs at least one recorded answer")
        self.provider = provider
        self.model = model
        self._answers = tuple(answers)
        self._usage = usage if usage is not None else Usage()
        self._clock = clock
        self.requests: list[Request] = []  # what was asked, in order

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        self.requests.append(request)
        arguments = self._answers[min(len(self.requests), len(self._answers)) - 1]
        if self._clock is not None:
            self._clock.advance(self._usage.seconds)
        return Answer(
            arguments=copy.deepcopy(arguments),  # the router's caller may keep it; the recording stays as it was
            problem=None if arguments is not None else "the recorded model called no function",
            input_tokens=self._usage.input,
            output_tokens=self._usage.output,
        )


def replay_model(tier: Tier, *, input_usd_per_mtok: float, output_usd_per_mtok: float) -> ModelConfig:
    """The config of the recorded model of `tier` (`recorded/<tier>`), priced as given."""
    # "recorded" is not a Provider a settings file may name (see the module's docstring): built unvalidated.
    values: dict[str, Any] = {
        "provider": RECORDED, "model": tier.value, "input_usd_per_mtok": input_usd_per_mtok,
        "output_usd_per_mtok": output_usd_per_mtok,
    }  # fmt: skip
    return ModelConfig.model_construct(**values)
