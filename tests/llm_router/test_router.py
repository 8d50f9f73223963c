"""The router with scripted in-test providers, a hand-moved clock and recorded sleeps: nothing really waits.

Each `Scripted` provider answers from a list: an `Answer`, a `ProviderError`
to raise, or any other exception (a provider bug). `Clock.sleep` records the
delay and moves the clock, so Retry-After and backoff are asserted exactly.
The routing table at the end pins the tier of 38 feature sets under the
default thresholds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from pydantic import JsonValue

from llm_router import (
    REDACTED,
    Answer,
    BudgetSpent,
    ChatMessage,
    ChatProvider,
    Features,
    InvalidAnswer,
    LlmConfig,
    ModelConfig,
    NoModelAnswered,
    NoValidAnswer,
    RateLimits,
    Redactor,
    Request,
    Router,
    Tier,
    ToolSpec,
    build_router,
    score,
)
from llm_router.config import (
    BreakerConfig,
    BudgetConfig,
    ProviderLimitConfig,
    RetryConfig,
    TiersConfig,
)
from llm_router.errors import (
    ConnectionFailed,
    ProviderTimeout,
    RateLimited,
    RequestRejected,
    ServerError,
)
from llm_router.limits import estimate_tokens

TOOL = ToolSpec(name="submit_plan", description="Submit the plan.", parameters={"type": "object"})
MESSAGES = (ChatMessage(role="system", content="You plan."), ChatMessage(role="user", content="Fix it."))
GOOD: dict[str, JsonValue] = {"reasoning": "restart", "steps": [{"tool": "restart"}]}
BAD: dict[str, JsonValue] = {"reasoning": "guess", "steps": [{"tool": "rm_rf"}]}


def answer(arguments: dict[str, JsonValue] | None = GOOD, *, tokens: tuple[int, int] = (10, 5), **kw: str) -> Answer:
    return Answer(arguments=arguments, input_tokens=tokens[0], output_tokens=tokens[1], **kw)


def validate(arguments: dict[str, JsonValue]) -> str:
    steps = arguments.get("steps")
    assert isinstance(steps, list)
    tools = [step["tool"] for step in steps if isinstance(step, dict)]
    if "rm_rf" in tools:
        raise InvalidAnswer("unknown_tool", "step 1 names tool 'rm_rf', which is not in the catalogue.")
    return ",".join(str(tool) for tool in tools)


class Clock:
    def __init__(self) -> None:
        self.t = 10_000.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


class Scripted:
    """A ChatProvider that answers from `script` in order and records every request it gets."""

    def __init__(self, name: str, script: Sequence[Answer | BaseException], *, clock: Clock, latency: float = 1.0):
        self.provider = "openai"
        self.model = name
        self.script = list(script)
        self.requests: list[Request] = []
        self.timeouts: list[float] = []
        self.clock = clock
        self.latency = latency

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        self.requests.append(request)
        self.timeouts.append(timeout)
        self.clock.t += self.latency
        if not self.script:
            raise AssertionError(f"{self.model} was asked more often than scripted")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def calls(self) -> int:
        return len(self.requests)


class Hangs:
    provider = "openai"
    model = "hangs"

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        await asyncio.Event().wait()  # an SDK that ignores its timeout
        raise AssertionError("unreachable")


@dataclass
class Events:
    requests: list[dict[str, object]] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)

    def request(
        self,
        *,
        provider: str,
        model: str,
        tier: str,
        result: str,
        seconds: float,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
    ) -> None:
        self.requests.append(
            dict(
                provider=provider,
                model=model,
                tier=tier,
                result=result,
                seconds=seconds,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cost_usd=cost_usd,
            )
        )

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)

    @property
    def results(self) -> list[str]:
        return [str(r["result"]) for r in self.requests]


@dataclass
class Setup:
    router: Router
    clock: Clock
    events: Events


def model_config(provider: ChatProvider, **kw: object) -> ModelConfig:
    return ModelConfig.model_validate({"provider": "openai", "model": provider.model, **kw})


def setup(
    clock: Clock,
    tiers: dict[Tier, list[ChatProvider]],
    *,
    prices: Mapping[str, object] | None = None,
    redactor: Redactor | None = None,
    limits: RateLimits | None = None,
    **config: object,
) -> Setup:
    configs = {tier: [(model_config(p, **(prices or {})), p) for p in providers] for tier, providers in tiers.items()}
    settings = LlmConfig.model_validate(
        {
            "tiers": TiersConfig.model_validate({t.value: [c for c, _ in pairs] for t, pairs in configs.items()}),
            **config,
        }
    )
    events = Events()
    router = Router(
        config=settings,
        providers=configs,
        events=events,
        redactor=redactor or Redactor(),
        now=clock.now,
        sleep=clock.sleep,
        random=lambda: 1.0,
        limits=limits,
    )
    return Setup(router, clock, events)


async def solve(s: Setup, tier: Tier = Tier.SMALL, **kw: object) -> object:
    return await s.router.solve(messages=MESSAGES, tool=TOOL, tier=tier, validate=validate, **kw)  # type: ignore[arg-type]


# --- fallback, retries, timeouts, breaker ---------------------------------------------------------------------------


async def test_the_first_model_that_answers_wins() -> None:
    clock = Clock()
    a = Scripted("a", [answer()], clock=clock)
    b = Scripted("b", [], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.value == "restart"
    assert solved.planner == "llm:small:openai/a"
    assert (a.calls, b.calls) == (1, 0)
    assert a.requests[0].messages == MESSAGES and a.requests[0].tool == TOOL
    assert a.timeouts == [60.0]


async def test_fallback_in_a_tier_on_a_non_retryable_error() -> None:
    clock = Clock()
    a = Scripted("a", [RequestRejected("openai a: HTTP 401 (unauthorized)", status=401)], clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.model.model == "b"
    assert [(x.model, x.result) for x in solved.attempts] == [("a", "rejected"), ("b", "ok")]
    assert clock.sleeps == []  # a non-retryable error moves on at once


async def test_retryable_errors_are_retried_with_jittered_backoff_then_fall_back() -> None:
    clock = Clock()
    a = Scripted("a", [ServerError("openai a: HTTP 500", status=500)] * 3, clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]}, circuit_breaker=BreakerConfig(failures=5))
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert a.calls == 3
    assert clock.sleeps == [0.5, 1.0]  # base 0.5 s doubling; random() == 1.0 takes the whole backoff
    assert solved.model.model == "b"
    assert s.events.results == ["server_error"] * 3 + ["ok"]


async def test_backoff_jitter_keeps_at_least_half_and_is_capped() -> None:
    clock = Clock()
    a = Scripted("a", [ConnectionFailed("openai a: cannot connect")] * 4 + [answer()], clock=clock)
    s = setup(
        clock,
        {Tier.SMALL: [a]},
        retry=RetryConfig(attempts=5, backoff_base_seconds=1.0, backoff_max_seconds=3.0),
        circuit_breaker=BreakerConfig(failures=9),
    )
    s.router._random = lambda: 0.0  # the lowest jitter
    await solve(s)
    assert clock.sleeps == [0.5, 1.0, 1.5, 1.5]  # half of 1, 2, min(4, 3), min(8, 3)


async def test_retry_after_is_honoured() -> None:
    clock = Clock()
    a = Scripted(
        "a", [RateLimited("openai a: HTTP 429 (rate limited)", status=429, retry_after=7.0), answer()], clock=clock
    )
    s = setup(clock, {Tier.SMALL: [a]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert clock.sleeps == [7.0]
    assert [x.result for x in solved.attempts] == ["rate_limited", "ok"]


async def test_a_retry_after_longer_than_allowed_gives_the_model_up() -> None:
    clock = Clock()
    a = Scripted("a", [RateLimited("openai a: HTTP 429 (rate limited)", status=429, retry_after=61.0)], clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert clock.sleeps == []
    assert (a.calls, solved.model.model) == (1, "b")

    # The quiet it asked for holds for later plans too, past the breaker's own reset.
    b.script.append(answer())
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert (a.calls, solved.model.model) == (1, "b")
    clock.t += 61.0
    a.script.append(answer())
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert (a.calls, solved.model.model) == (2, "a")


async def test_a_provider_timeout_is_retried() -> None:
    clock = Clock()
    a = Scripted("a", [ProviderTimeout("openai a: timed out"), answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert [x.result for x in solved.attempts] == ["timeout", "ok"]
    assert len(clock.sleeps) == 1


async def test_the_router_enforces_the_timeout_when_the_sdk_does_not() -> None:
    clock = Clock()
    b = Scripted("b", [answer()], clock=clock)
    hangs = Hangs()
    settings = LlmConfig.model_validate(
        {
            "tiers": {
                "small": [
                    {"provider": "openai", "model": "hangs", "timeout_seconds": 0.01},
                    {"provider": "openai", "model": "b"},
                ]
            },
            "retry": {"attempts": 1},
        }
    )
    events = Events()
    router = Router(
        config=settings,
        providers={Tier.SMALL: [(settings.tiers.small[0], hangs), (settings.tiers.small[1], b)]},
        events=events,
        redactor=Redactor(),
        now=clock.now,
        sleep=clock.sleep,
    )
    solved = await router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert events.results == ["timeout", "ok"]
    assert solved.model.model == "b"


async def test_a_provider_bug_is_that_model_failing() -> None:
    clock = Clock()
    a = Scripted("a", [KeyError("choices")], clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert [x.result for x in solved.attempts] == ["bad_response", "ok"]
    assert clock.sleeps == []


async def test_breaker_opens_after_n_failures_and_half_opens_after_t() -> None:
    clock = Clock()
    a = Scripted("a", [ServerError("openai a: HTTP 503", status=503)] * 2 + [answer(), answer()], clock=clock)
    b = Scripted("b", [answer()] * 3, clock=clock)
    s = setup(
        clock,
        {Tier.SMALL: [a, b]},
        retry=RetryConfig(attempts=1),
        circuit_breaker=BreakerConfig(failures=2, reset_seconds=30.0),
    )
    await solve(s)  # a fails once, b answers
    await solve(s)  # a fails again: open
    assert (a.calls, b.calls) == (2, 2)
    await solve(s)  # a is skipped while open
    assert (a.calls, b.calls) == (2, 3)
    clock.t += 30.0
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.model.model == "a"  # the half-open trial succeeded: closed again
    await solve(s)
    assert (a.calls, b.calls) == (4, 3)


async def test_a_breaker_opening_mid_retries_stops_the_retries() -> None:
    clock = Clock()
    a = Scripted("a", [ServerError("openai a: HTTP 500", status=500)] * 2, clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]}, retry=RetryConfig(attempts=5), circuit_breaker=BreakerConfig(failures=2))
    await solve(s)
    assert a.calls == 2
    assert clock.sleeps == [0.5]


async def test_an_invalid_answer_is_a_breaker_success() -> None:
    clock = Clock()
    a = Scripted("a", [answer(BAD)] * 4, clock=clock)
    s = setup(clock, {Tier.SMALL: [a]}, circuit_breaker=BreakerConfig(failures=1))
    for _ in range(2):
        with pytest.raises(NoValidAnswer):
            await solve(s)
    assert a.calls == 4


async def test_no_model_answered_names_the_last_error_and_when_to_retry() -> None:
    clock = Clock()
    a = Scripted("a", [ServerError("openai a: HTTP 502", status=502)], clock=clock)
    b = Scripted("b", [ConnectionFailed("openai b: cannot connect to 127.0.0.1:9")], clock=clock)
    s = setup(
        clock,
        {Tier.SMALL: [a], Tier.STANDARD: [b]},
        retry=RetryConfig(attempts=1),
        circuit_breaker=BreakerConfig(failures=1, reset_seconds=45.0),
    )
    with pytest.raises(NoModelAnswered) as caught:
        await solve(s)
    assert (
        str(caught.value)
        == "no model in tier standard answered; the last error: openai b: cannot connect to 127.0.0.1:9"
    )
    assert caught.value.retry_after == pytest.approx(44.0)  # a opened 1 s (b's latency) before the end
    clock.t += 1
    with pytest.raises(NoModelAnswered, match="every circuit is open") as caught:
        await solve(s)
    assert (a.calls, b.calls) == (1, 1)
    assert caught.value.retry_after == pytest.approx(43.0)


async def test_no_model_answered_waits_30_s_when_a_circuit_is_still_closed() -> None:
    clock = Clock()
    a = Scripted("a", [RequestRejected("openai a: HTTP 404 (unknown model)", status=404)], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]})
    with pytest.raises(NoModelAnswered) as caught:
        await solve(s)
    assert caught.value.retry_after == 30.0


async def test_nothing_configured() -> None:
    s = setup(Clock(), {})
    assert not s.router.configured
    with pytest.raises(NoModelAnswered, match="no language model is configured"):
        await solve(s)


# --- repair turn and escalation -------------------------------------------------------------------------------------


async def test_the_repair_turn_carries_the_rejection_and_can_succeed() -> None:
    clock = Clock()
    a = Scripted("a", [answer(BAD), answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.value == "restart" and solved.tier is Tier.SMALL
    repair = a.requests[1].messages
    assert repair[:2] == MESSAGES
    assert repair[2] == ChatMessage(
        role="assistant", content='submit_plan({"reasoning": "guess", "steps": [{"tool": "rm_rf"}]})'
    )
    assert repair[3] == ChatMessage(
        role="user",
        content="Your answer was rejected: step 1 names tool 'rm_rf', which is not in the catalogue. Call submit_plan "
        "again with a corrected plan; if no tool in the catalogue can fix this, call it with no steps and say why "
        "in reasoning.",
    )
    assert [x.rejection for x in solved.attempts] == ["unknown_tool", None]
    assert s.events.rejections == ["unknown_tool"]


async def test_no_tool_call_is_rejected_with_the_providers_problem_and_the_text_is_echoed() -> None:
    clock = Clock()
    a = Scripted(
        "a", [answer(None, problem="the model called no function", text="I would restart it."), answer()], clock=clock
    )
    s = setup(clock, {Tier.SMALL: [a]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.attempts[0].rejection == "no_tool_call"
    assert s.events.rejections == ["no_tool_call"]
    assert a.requests[1].messages[2].content == "I would restart it."
    assert a.requests[1].messages[3].content.startswith("Your answer was rejected: the model called no function. Call")


async def test_escalation_small_standard_large_with_fresh_messages() -> None:
    clock = Clock()
    small = Scripted("small", [answer(BAD), answer(BAD)], clock=clock)
    standard = Scripted("standard", [answer(BAD), answer(BAD)], clock=clock)
    large = Scripted("large", [answer()], clock=clock)
    spare = Scripted("spare-small", [], clock=clock)
    s = setup(clock, {Tier.SMALL: [small, spare], Tier.STANDARD: [standard], Tier.LARGE: [large]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.tier is Tier.LARGE
    assert solved.planner == "llm:large:openai/large"
    assert spare.calls == 0  # an answer, even an invalid one, decides the tier
    assert large.requests[0].messages == MESSAGES
    assert [(x.tier.value, x.rejection) for x in solved.attempts] == [
        ("small", "unknown_tool"),
        ("small", "unknown_tool"),
        ("standard", "unknown_tool"),
        ("standard", "unknown_tool"),
        ("large", None),
    ]
    assert s.events.rejections == ["unknown_tool"] * 4


async def test_when_large_fails_too_there_is_no_valid_answer() -> None:
    clock = Clock()
    small = Scripted("small", [answer(BAD)] * 2, clock=clock)
    large = Scripted("large", [answer(BAD)] * 2, clock=clock)
    s = setup(clock, {Tier.SMALL: [small], Tier.LARGE: [large]})
    with pytest.raises(NoValidAnswer, match=r"^step 1 names tool 'rm_rf', which is not in the catalogue\.$") as caught:
        await solve(s)
    assert caught.value.retry_after is None


async def test_escalate_false_stays_in_the_tier() -> None:
    clock = Clock()
    small = Scripted("small", [answer(BAD)] * 2, clock=clock)
    large = Scripted("large", [], clock=clock)
    s = setup(clock, {Tier.SMALL: [small], Tier.LARGE: [large]})
    with pytest.raises(NoValidAnswer):
        await solve(s, escalate=False)
    assert large.calls == 0


async def test_a_rejected_tier_then_an_unreachable_one_is_worth_retrying() -> None:
    clock = Clock()
    small = Scripted("small", [answer(BAD)] * 2, clock=clock)
    large = Scripted("large", [ServerError("openai large: HTTP 500", status=500)], clock=clock)
    s = setup(clock, {Tier.SMALL: [small], Tier.LARGE: [large]}, retry=RetryConfig(attempts=1))
    with pytest.raises(NoModelAnswered, match="openai large: HTTP 500"):
        await solve(s)


async def test_a_failed_repair_call_moves_to_the_next_model() -> None:
    clock = Clock()
    a = Scripted("a", [answer(BAD), RequestRejected("openai a: HTTP 400", status=400)], clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a, b]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert solved.model.model == "b"
    assert b.requests[0].messages == MESSAGES


async def test_model_names_one_model() -> None:
    clock = Clock()
    a = Scripted("a", [], clock=clock)
    b = Scripted("b", [answer()], clock=clock)
    c = Scripted("c", [], clock=clock)
    s = setup(clock, {Tier.SMALL: [a], Tier.STANDARD: [b], Tier.LARGE: [c]})
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate, model="openai/b")
    assert solved.tier is Tier.STANDARD and (a.calls, c.calls) == (0, 0)
    with pytest.raises(ValueError, match="model openai/nope is not configured in tier small or above"):
        await solve(s, model="openai/nope")
    with pytest.raises(ValueError, match=r"model openai/b is not configured in tier small$"):
        await solve(s, model="openai/b", escalate=False)


# --- budget, token allowance, events -------------------------------------------------------------------------------


PRICES = {"input_usd_per_mtok": 1_000_000.0, "output_usd_per_mtok": 2_000_000.0}  # 1 USD / input, 2 USD / output token


async def test_every_call_is_an_event_and_charged() -> None:
    clock = Clock()
    a = Scripted(
        "a",
        [ServerError("openai a: HTTP 500", status=500), answer(BAD, tokens=(3, 1)), answer(tokens=(4, 2))],
        clock=clock,
        latency=2.0,
    )
    s = setup(clock, {Tier.SMALL: [a]}, prices=PRICES)
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=Tier.SMALL, validate=validate)
    assert s.events.requests == [
        dict(
            provider="openai",
            model="a",
            tier="small",
            result="server_error",
            seconds=2.0,
            input_tokens=0,
            output_tokens=0,
            cost_usd=0.0,
        ),
        dict(
            provider="openai",
            model="a",
            tier="small",
            result="ok",
            seconds=2.0,
            input_tokens=3,
            output_tokens=1,
            cost_usd=5.0,
        ),
        dict(
            provider="openai",
            model="a",
            tier="small",
            result="ok",
            seconds=2.0,
            input_tokens=4,
            output_tokens=2,
            cost_usd=8.0,
        ),
    ]
    assert s.events.rejections == ["unknown_tool"]
    assert (solved.tokens, solved.cost_usd, solved.seconds) == (10, 13.0, 6.0)
    assert s.router.budget_remaining() is None


async def test_a_spent_budget_stops_before_any_call() -> None:
    clock = Clock()
    a = Scripted("a", [answer(tokens=(3, 1))], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]}, prices=PRICES, budget=BudgetConfig(usd_per_hour=5.0))
    await solve(s)
    assert s.router.budget_remaining() == 0.0
    clock.t += 600
    with pytest.raises(BudgetSpent, match="the model budget of 5 USD per hour is spent") as caught:
        await solve(s)
    assert caught.value.retry_after == pytest.approx(3000.0)
    assert a.calls == 1


async def test_the_budget_is_checked_before_every_call_of_a_solve() -> None:
    clock = Clock()
    a = Scripted("a", [answer(BAD, tokens=(3, 1))], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]}, prices=PRICES, budget=BudgetConfig(usd_per_hour=4.0))
    with pytest.raises(BudgetSpent):
        await solve(s)  # the answer spent it: no repair turn
    assert a.calls == 1


async def test_the_per_plan_token_allowance_caps_answers_and_stops() -> None:
    clock = Clock()
    a = Scripted("a", [answer(BAD, tokens=(600, 300)), answer(BAD, tokens=(150, 50))], clock=clock)
    b = Scripted("b", [], clock=clock)
    s = setup(
        clock,
        {Tier.SMALL: [a], Tier.LARGE: [b]},
        budget=BudgetConfig(max_tokens_per_plan=1000),
        max_output_tokens=800,
    )
    with pytest.raises(NoValidAnswer, match=r"^the plan used its token budget of 1000 tokens without a valid answer$"):
        await solve(s)
    assert [r.max_tokens for r in a.requests] == [800, 100]
    assert b.calls == 0


# --- redaction and rate limits -------------------------------------------------------------------------------------


async def test_every_message_is_redacted_before_it_leaves_including_the_echoed_answer() -> None:
    clock = Clock()
    key = "configured-Canary-api-key-0001"
    github = "ghp_" + "C4n4ry" * 6
    leaky: dict[str, JsonValue] = {"reasoning": f"use {github}", "steps": [{"tool": "rm_rf"}]}
    a = Scripted("a", [answer(leaky), answer()], clock=clock)
    messages = [
        ChatMessage(role="system", content=f"key {key}"),
        ChatMessage(role="user", content="db: postgres://app:Canary-pass@db/app, AWS AKIA" + "CANARYCANARY1234"),
    ]
    s = setup(clock, {Tier.SMALL: [a]}, redactor=Redactor().with_literals([key]))
    await s.router.solve(messages=messages, tool=TOOL, tier=Tier.SMALL, validate=validate)
    sent = "\n".join(m.content for r in a.requests for m in r.messages)
    for canary in (key, "Canary-pass", "CANARYCANARY1234", github):
        assert canary not in sent
    assert sent.count(REDACTED) == 2 * 3 + 1


class RecordedLimits(RateLimits):
    def __init__(self, log: list[str], **providers: ProviderLimitConfig) -> None:
        super().__init__(providers)  # type: ignore[arg-type]
        self.log = log

    async def acquire(self, provider: str, tokens_estimate: int) -> None:
        self.log.append(f"acquire {provider} {tokens_estimate}")
        await super().acquire(provider, tokens_estimate)


class Logged(Scripted):
    def __init__(self, log: list[str], *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.log = log

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        self.log.append(f"ask {self.model}")
        return await super().ask(request, timeout=timeout)


async def test_rate_limits_are_acquired_before_every_call_with_the_token_estimate() -> None:
    clock = Clock()
    log: list[str] = []
    a = Logged(log, "a", [ServerError("openai a: HTTP 500", status=500), answer()], clock=clock)
    s = setup(clock, {Tier.SMALL: [a]}, limits=RecordedLimits(log), max_output_tokens=100)
    await solve(s)
    estimate = len("You plan.Fix it.") // 4 + 100
    assert log == [f"acquire openai {estimate}", "ask a", f"acquire openai {estimate}", "ask a"]


async def test_a_provider_over_its_request_rate_waits_for_the_limiter() -> None:
    clock = Clock()
    a = Scripted("a", [answer(), answer()], clock=clock)
    limits = RateLimits({"openai": ProviderLimitConfig(requests_per_minute=1)})
    s = setup(clock, {Tier.SMALL: [a]}, limits=limits)
    await solve(s)
    second = asyncio.ensure_future(solve(s))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not second.done() and a.calls == 1  # held by the limiter, not by the model
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_token_limits_clip_the_estimate_to_the_bucket_and_then_wait() -> None:
    limits = RateLimits({"openai": ProviderLimitConfig(tokens_per_minute=100)})
    await limits.acquire("openai", 5000)  # more than the bucket holds: clipped, so it can go at all
    # A second full bucket needs the whole minute to drain: no scheduling hiccup makes this flaky.
    assert not limits.has_capacity("openai", 5000)
    waiting = asyncio.ensure_future(limits.acquire("openai", 5000))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
    assert limits.has_capacity("anthropic", 10**9)  # no limits configured: never waits


def test_token_estimate_is_a_quarter_of_the_characters_plus_the_answer_cap() -> None:
    request = Request(messages=(ChatMessage(role="user", content="x" * 41),), tool=TOOL, max_tokens=7)
    assert estimate_tokens(request) == 10 + 7


async def test_sub_one_per_minute_limits_still_let_one_request_go() -> None:
    limits = RateLimits({"ollama": ProviderLimitConfig(requests_per_minute=0.5)})
    await limits.acquire("ollama", 1)
    assert not limits.has_capacity("ollama", 1)


# --- tiers ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "configured,asked,expected",
    [
        ({Tier.SMALL, Tier.STANDARD, Tier.LARGE}, Tier.STANDARD, Tier.STANDARD),
        ({Tier.SMALL, Tier.LARGE}, Tier.STANDARD, Tier.LARGE),  # above first
        ({Tier.SMALL}, Tier.LARGE, Tier.SMALL),  # else below
        ({Tier.SMALL, Tier.STANDARD}, Tier.LARGE, Tier.STANDARD),  # the nearest below
        ({Tier.LARGE}, Tier.SMALL, Tier.LARGE),
        ({Tier.STANDARD}, Tier.SMALL, Tier.STANDARD),
    ],
)
async def test_a_tier_without_models_routes_to_the_nearest_configured(
    configured: set[Tier], asked: Tier, expected: Tier
) -> None:
    clock = Clock()
    providers: dict[Tier, list[ChatProvider]] = {t: [Scripted(t.value, [answer()], clock=clock)] for t in configured}
    s = setup(clock, providers)
    total = {Tier.SMALL: 0.0, Tier.STANDARD: 0.3, Tier.LARGE: 0.6}[asked]
    assert s.router.tier_for(total) is expected
    solved = await s.router.solve(messages=MESSAGES, tool=TOOL, tier=asked, validate=validate, escalate=False)
    assert solved.tier is expected


# Features -> the tier the router picks with every tier configured and the default thresholds (0.3, 0.6).
ROUTING_TABLE: list[tuple[str, Features, Tier]] = [
    ("nothing", Features(), Tier.SMALL),
    ("one field", Features(changed_fields=1), Tier.SMALL),
    ("five fields", Features(changed_fields=5), Tier.SMALL),
    ("fields are capped", Features(changed_fields=60), Tier.SMALL),
    ("five fields, two resources", Features(changed_fields=5, changed_resources=2), Tier.STANDARD),
    ("two fields, three resources", Features(changed_fields=2, changed_resources=3), Tier.SMALL),
    ("no resource", Features(changed_resources=0), Tier.SMALL),
    ("resources are capped", Features(changed_resources=10), Tier.SMALL),
    ("info issue", Features(issue_severity="info"), Tier.SMALL),
    ("warning issue", Features(issue_severity="warning"), Tier.SMALL),
    ("critical issue", Features(issue_severity="critical"), Tier.STANDARD),
    ("critical, hint 0", Features(issue_severity="critical", hint=0.0), Tier.STANDARD),
    ("warning, three fields", Features(issue_severity="warning", changed_fields=3), Tier.STANDARD),
    ("warning, two fields", Features(issue_severity="warning", changed_fields=2), Tier.SMALL),
    ("info, four fields", Features(issue_severity="info", changed_fields=4), Tier.SMALL),
    ("two tools", Features(candidate_tools=2), Tier.SMALL),
    ("tools are capped", Features(candidate_tools=12), Tier.SMALL),
    (
        "tools, warning, a field",
        Features(candidate_tools=12, issue_severity="warning", changed_fields=1),
        Tier.STANDARD,
    ),
    ("three tools, a field", Features(candidate_tools=3, changed_fields=1), Tier.SMALL),
    ("one failure", Features(failed_attempts=1), Tier.SMALL),
    ("two failures", Features(failed_attempts=2), Tier.STANDARD),
    ("three failures", Features(failed_attempts=3), Tier.STANDARD),
    ("failures are capped", Features(failed_attempts=4), Tier.STANDARD),
    ("three failures, info", Features(failed_attempts=3, issue_severity="info"), Tier.STANDARD),
    ("three failures, warning", Features(failed_attempts=3, issue_severity="warning"), Tier.LARGE),
    ("two failures, warning", Features(failed_attempts=2, issue_severity="warning"), Tier.STANDARD),
    ("critical, one failure", Features(issue_severity="critical", failed_attempts=1), Tier.STANDARD),
    ("critical, two failures", Features(issue_severity="critical", failed_attempts=2), Tier.LARGE),
    ("hint 1", Features(hint=1.0), Tier.SMALL),
    ("hint 0.5, warning", Features(hint=0.5, issue_severity="warning"), Tier.SMALL),
    ("hint 1, critical", Features(hint=1.0, issue_severity="critical"), Tier.STANDARD),
    ("hint 1, critical, two fields", Features(hint=1.0, issue_severity="critical", changed_fields=2), Tier.LARGE),
    ("wide change", Features(changed_fields=5, changed_resources=4, candidate_tools=7), Tier.STANDARD),
    ("wide change, hint", Features(changed_fields=5, changed_resources=4, candidate_tools=7, hint=0.5), Tier.LARGE),
    ("critical, wide", Features(issue_severity="critical", changed_resources=4, changed_fields=3), Tier.LARGE),
    (
        "just below large",
        Features(issue_severity="info", failed_attempts=3, candidate_tools=4, hint=0.25),
        Tier.STANDARD,
    ),
    ("just at large", Features(issue_severity="info", failed_attempts=3, candidate_tools=5, hint=0.25), Tier.LARGE),
    (
        "everything",
        Features(
            changed_fields=9,
            changed_resources=9,
            issue_severity="critical",
            candidate_tools=9,
            failed_attempts=9,
            hint=1,
        ),
        Tier.LARGE,
    ),
]


def test_the_routing_table_is_large_enough() -> None:
    assert len(ROUTING_TABLE) >= 30
    assert {tier for _, _, tier in ROUTING_TABLE} == set(Tier)


@pytest.mark.parametrize("features,expected", [row[1:] for row in ROUTING_TABLE], ids=[row[0] for row in ROUTING_TABLE])
def test_routing_table(features: Features, expected: Tier) -> None:
    clock = Clock()
    s = setup(clock, {t: [Scripted(t.value, [], clock=clock)] for t in Tier})
    assert s.router.tier_for(score(features).total) is expected


# --- build_router ---------------------------------------------------------------------------------------------------


def test_build_router_reads_keys_builds_providers_and_redacts_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SMALL_KEY", "small-Canary-key-000111")
    built: list[tuple[str, str | None]] = []
    clock = Clock()

    def build_provider(config: ModelConfig, *, api_key: str | None) -> ChatProvider:
        built.append((config.label, api_key))
        return Scripted(config.model, [], clock=clock)

    settings = LlmConfig.model_validate(
        {
            "tiers": {
                "small": [{"provider": "openai", "model": "m", "api_key_env": "TEST_SMALL_KEY"}],
                "large": [{"provider": "ollama", "model": "big", "base_url": "http://127.0.0.1:11434"}],
            },
            "redact_keys": ["*pin*"],
        }
    )
    router = build_router(settings, build_provider=build_provider)
    assert built == [("openai/m", "small-Canary-key-000111"), ("ollama/big", None)]
    assert router.configured
    assert router.redactor.text("k=small-Canary-key-000111") == f"k={REDACTED}"
    assert router.redactor.value({"PIN": 1}) == {"PIN": REDACTED}


def test_build_router_names_the_model_whose_key_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_MISSING_KEY", raising=False)
    settings = LlmConfig.model_validate(
        {
            "tiers": {
                "standard": [
                    {"provider": "ollama", "model": "a"},
                    {"provider": "openai", "model": "b", "api_key_env": "TEST_MISSING_KEY"},
                ]
            }
        }
    )
    with pytest.raises(ValueError, match=r"^llm\.tiers\.standard\.1: environment variable TEST_MISSING_KEY is not set"):
        build_router(settings, build_provider=lambda config, *, api_key: Scripted("x", [], clock=Clock()))


def test_build_router_with_no_models_builds_no_provider() -> None:
    router = build_router(LlmConfig())
    assert not router.configured
    assert router.budget_remaining() is None
