"""The router: one structured answer from the cheapest model that gives a valid one, within budget.

`solve` walks the tiers from the one it is given upwards (only that tier
with `escalate=False`). Inside a tier the models are tried in their
configured order and the first that answers decides the tier:

    for each tier, from `tier` up:
        for each model whose circuit allows a call (and, with `model=`, that is the one named):
            calls: rate limits, then the call; retryable errors (429, 5xx, timeout, connection) are
                   retried up to `retry.attempts` calls, waiting Retry-After when the provider sent one
                   (or giving the model up when it is longer than `retry.max_retry_after_seconds`),
                   else a jittered exponential backoff; any other error gives the model up at once
            no answer          -> the next model in the tier
            a valid answer     -> done: `Solved`
            an invalid answer  -> one repair turn to the same model, carrying the rejection;
                                  still invalid -> the next tier, from the original messages

Every call, failed or not, is reported to `events.request` (for metrics),
recorded as an `Attempt`, and charged to the hourly budget at the model's
prices. A failed call counts towards the model's circuit breaker; an answer
of any kind closes it. Before every call the budget (`BudgetSpent`) and the
plan's token allowance (`llm.budget.max_tokens_per_plan`, input plus output
over every call of this `solve`: `NoValidAnswer` once used up) are checked,
and the answer's `max_tokens` is what is left of that allowance, at most
`llm.max_output_tokens`. Waiting for a rate limit is not part of a call's
timeout; the call itself has `timeout_seconds` on the provider (its SDK's
own timeout) and around it (in case the SDK does not keep it).

Every message passes `redactor.text` as the request is built, whatever the
caller already did: it is the last pass before anything leaves the process,
and it also covers the model's own earlier answer echoed in a repair turn.

How `solve` fails: the highest tier tried decides. When a model in it
answered and every answer was rejected: `NoValidAnswer` with the last
rejection (asking again with the same inputs will not help). When no model
in it answered: `NoModelAnswered`, naming the last error, with `retry_after`
when the first open circuit will let a call through again (30 s when some
circuit is still closed: its model failed just now but may be tried). A
mixed walk (small answered and was rejected, standard and large are down)
is the second kind: a later try may well succeed. Validation is the caller's
`validate`: it returns the checked value or raises `InvalidAnswer`; anything
else it raises propagates.

Time is injected (`now`, `sleep`) and so is the jitter (`random`), so tests
run on a fake clock with recorded sleeps. The router holds no per-solve
state: concurrent `solve` calls share only the circuits, the budget and the
rate limits, which are what they should share.
"""

from __future__ import annotations

import asyncio
import json
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Generic, Protocol, TypeVar

import structlog
from pydantic import JsonValue
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from llm_router.breaker import BreakerState, CircuitBreaker
from llm_router.budget import Budget
from llm_router.complexity import tier_for as _tier_for_total
from llm_router.config import LlmConfig, ModelConfig, read_api_key
from llm_router.errors import (
    BadResponse,
    BudgetSpent,
    ConnectionFailed,
    InvalidAnswer,
    NoModelAnswered,
    NoValidAnswer,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RequestRejected,
    ServerError,
)
from llm_router.events import NoEvents, RouterEvents
from llm_router.interfaces import Answer, ChatMessage, ChatProvider, Request, Tier, ToolSpec
from llm_router.limits import RateLimits, estimate_tokens
from llm_router.redact import Redactor

T = TypeVar("T")

log = structlog.get_logger("setpoint.llm")

NO_MODEL_RETRY_SECONDS = 30.0
REPAIR_PROMPT = (
    "Your answer was rejected: {message}. Call {tool} again with a corrected plan; if no tool in the catalogue "
    "can fix this, call it with no steps and say why in reasoning."
)
_RESULTS: tuple[tuple[type[ProviderError], str], ...] = (
    (RateLimited, "rate_limited"),
    (ServerError, "server_error"),
    (ProviderTimeout, "timeout"),
    (ConnectionFailed, "connection"),
    (RequestRejected, "rejected"),
    (BadResponse, "bad_response"),
)
_NO_EVENTS = NoEvents()


def result_label(error: ProviderError) -> str:
    """The `result` label of `events.request` for a failed call."""
    for kind, label in _RESULTS:
        if isinstance(error, kind):
            return label
    return "bad_response"


@dataclass(frozen=True)
class Attempt:
    """One call to one model. `result` is `events.request`'s label; `rejection` is why a received answer
    was rejected (`InvalidAnswer.reason`, or "no_tool_call"), None when it was not or there was none."""

    tier: Tier
    provider: str
    model: str
    result: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    seconds: float
    rejection: str | None = None


@dataclass(frozen=True)
class Solved(Generic[T]):
    """The validated value, the model that gave it, and every call it took (from every model and tier)."""

    value: T
    tier: Tier
    model: ModelConfig
    attempts: tuple[Attempt, ...]

    @property
    def planner(self) -> str:
        return f"llm:{self.tier.value}:{self.model.provider}/{self.model.model}"

    @property
    def tokens(self) -> int:
        return sum(a.input_tokens + a.output_tokens for a in self.attempts)

    @property
    def cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts)

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.attempts)


class ProviderFactory(Protocol):
    def __call__(self, config: ModelConfig, *, api_key: str | None) -> ChatProvider: ...


@dataclass(frozen=True)
class _Model:
    tier: Tier
    config: ModelConfig
    provider: ChatProvider
    breaker: CircuitBreaker


@dataclass(frozen=True)
class _Valid(Generic[T]):
    value: T


class _Outcome(Enum):
    NO_ANSWER = "no_answer"  # every call failed: try the next model
    INVALID = "invalid"  # answered, rejected, repair rejected too: try the next tier


@dataclass
class _Run:
    """One `solve`'s state."""

    messages: tuple[ChatMessage, ...]
    tool: ToolSpec
    attempts: list[Attempt] = field(default_factory=list)
    tokens: int = 0
    last_error: str | None = None
    last_rejection: str | None = None


class Router:
    """Routes `solve` over the models of `providers` (per tier, in order) under `config`'s limits.

    Options: `events` defaults to none reported; `now` to `time.monotonic`; `sleep` to `asyncio.sleep`;
    `random` (0..1, for backoff jitter) to `random.random`; `limits` to `RateLimits(config.providers)`.
    """

    def __init__(
        self,
        *,
        config: LlmConfig,
        providers: Mapping[Tier, Sequence[tuple[ModelConfig, ChatProvider]]],
        redactor: Redactor,
        events: RouterEvents = _NO_EVENTS,
        now: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        limits: RateLimits | None = None,
    ) -> None:
        self._config = config
        self._events = events
        self._redactor = redactor
        self._now = now
        self._sleep = sleep
        self._random = random
        self._limits = limits if limits is not None else RateLimits(config.providers)
        self._budget = Budget(config.budget.usd_per_hour, now=now)
        breakers: dict[tuple[str, str, str | None], CircuitBreaker] = {}  # one per endpoint, shared across tiers
        self._models: dict[Tier, tuple[_Model, ...]] = {}
        for tier in Tier:
            models = []
            for model, provider in providers.get(tier, ()):
                breaker = breakers.setdefault(
                    (model.provider, model.model, model.base_url),
                    CircuitBreaker(
                        failures=config.circuit_breaker.failures,
                        reset_seconds=config.circuit_breaker.reset_seconds,
                        now=now,
                    ),
                )
                models.append(_Model(tier, model, provider, breaker))
            self._models[tier] = tuple(models)

    @property
    def configured(self) -> bool:
        """Is there at least one model in some tier?"""
        return any(self._models.values())

    @property
    def redactor(self) -> Redactor:
        """The redactor every request passes through (with the configured API keys as literals)."""
        return self._redactor

    def tier_for(self, total: float) -> Tier:
        """The tier for a complexity total, moved to the nearest configured tier (above first, else below)."""
        return self._configured(_tier_for_total(total, self._config.routing))

    def budget_remaining(self) -> float | None:
        """USD left in the rolling hour; None when there is no budget."""
        return self._budget.remaining()

    async def solve(
        self,
        *,
        messages: Sequence[ChatMessage],
        tool: ToolSpec,
        tier: Tier,
        validate: Callable[[dict[str, JsonValue]], T],
        escalate: bool = True,
        model: str | None = None,
    ) -> Solved[T]:
        """The first valid answer, from `tier` (moved to the nearest configured one) upwards.

        `escalate=False` stays in that tier; `model` ("provider/model") asks only that model (ValueError when
        it is not configured in the tiers walked). Raises BudgetSpent, NoModelAnswered or NoValidAnswer.
        """
        self._check_budget()
        run = _Run(messages=tuple(messages), tool=tool)
        walk = self._walk(self._configured(tier), escalate=escalate, model=model)
        answered_last = False
        for models in walk:
            answered_last = False
            for candidate in models:
                if not candidate.breaker.allows():
                    continue
                outcome = await self._try_model(run, candidate, validate)
                if isinstance(outcome, _Valid):
                    return Solved(outcome.value, candidate.tier, candidate.config, tuple(run.attempts))
                if outcome is _Outcome.INVALID:
                    answered_last = True
                    break
        raise self._failure(run, walk, answered_last=answered_last)

    def _configured(self, tier: Tier) -> Tier:
        order = list(Tier)
        index = order.index(tier)
        for candidate in [*order[index:], *reversed(order[:index])]:
            if self._models[candidate]:
                return candidate
        return tier

    def _walk(self, start: Tier, *, escalate: bool, model: str | None) -> list[tuple[_Model, ...]]:
        """The models to try, per tier, from `start` up: tiers with none left out."""
        tiers = list(Tier)[list(Tier).index(start) :] if escalate else [start]
        walk = [tuple(m for m in self._models[t] if model is None or m.config.label == model) for t in tiers]
        walk = [models for models in walk if models]
        if model is not None and not walk:
            where = f"tier {start.value} or above" if escalate else f"tier {start.value}"
            raise ValueError(f"model {model} is not configured in {where}")
        return walk

    def _check_budget(self) -> None:
        if self._budget.spent():
            raise BudgetSpent(
                f"the model budget of {self._budget.usd_per_hour:g} USD per hour is spent",
                retry_after=self._budget.frees_in(),
            )

    def _failure(self, run: _Run, walk: list[tuple[_Model, ...]], *, answered_last: bool) -> Exception:
        if not walk:
            return NoModelAnswered("no language model is configured (llm.tiers is empty)")
        if answered_last:
            return NoValidAnswer(run.last_rejection or "every answer was rejected")
        tier = walk[-1][0].tier.value
        ready = min(m.breaker.ready_in() for models in walk for m in models)
        retry_after = ready if ready > 0 else NO_MODEL_RETRY_SECONDS
        if run.last_error is None:
            return NoModelAnswered(
                f"no model in tier {tier} may be called: every circuit is open after failures", retry_after=retry_after
            )
        return NoModelAnswered(
            f"no model in tier {tier} answered; the last error: {run.last_error}", retry_after=retry_after
        )

    async def _try_model(
        self, run: _Run, m: _Model, validate: Callable[[dict[str, JsonValue]], T]
    ) -> _Valid[T] | _Outcome:
        """The model's answer, then, if it is rejected, one repair turn carrying the rejection."""
        messages = run.messages
        for turn in range(2):
            answer = await self._ask(run, m, messages)
            if answer is None:
                return _Outcome.NO_ANSWER
            verdict = self._judge(run, answer, validate)
            if isinstance(verdict, _Valid):
                return verdict
            if turn == 0:
                messages = (*messages, *self._repair(run.tool, answer, verdict))
        return _Outcome.INVALID

    async def _ask(self, run: _Run, m: _Model, messages: tuple[ChatMessage, ...]) -> Answer | None:
        """One answer from `m`, retrying as configured; None when the model gave none (`run.last_error` says why)."""
        try:
            answer: Answer = await self._retrying(m.breaker)(self._call, run, m, messages)
        except ProviderError as e:
            run.last_error = str(e)
            return None
        m.breaker.success()
        return answer

    def _retrying(self, breaker: CircuitBreaker) -> AsyncRetrying:
        retry = self._config.retry

        def worth_retrying(error: BaseException) -> bool:
            if not isinstance(error, ProviderError) or not error.retryable:
                return False
            if breaker.state is not BreakerState.CLOSED:
                return False  # this very call opened it: the model is given up like any open one
            return error.retry_after is None or error.retry_after <= retry.max_retry_after_seconds

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            if isinstance(error, ProviderError) and error.retry_after is not None:
                return max(0.0, error.retry_after)
            ceiling = min(retry.backoff_max_seconds, retry.backoff_base_seconds * 2.0 ** (state.attempt_number - 1))
            return ceiling * (0.5 + 0.5 * self._random())  # "equal jitter": at least half the backoff

        return AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(retry.attempts),
            wait=wait,
            retry=retry_if_exception(worth_retrying),
            reraise=True,
        )

    async def _call(self, run: _Run, m: _Model, messages: tuple[ChatMessage, ...]) -> Answer:
        """One call: budget and token allowance first, then rate limits, then the call under its timeout."""
        self._check_budget()
        allowance = self._config.budget.max_tokens_per_plan
        if run.tokens >= allowance:
            raise NoValidAnswer(f"the plan used its token budget of {allowance} tokens without a valid answer")
        request = self._request(run, messages, max_tokens=min(self._config.max_output_tokens, allowance - run.tokens))
        await self._limits.acquire(m.config.provider, estimate_tokens(request))
        timeout = m.config.timeout_seconds
        started = self._now()
        try:
            async with asyncio.timeout(timeout):
                answer = await m.provider.ask(request, timeout=timeout)
        except ProviderError as e:
            error = e
        except TimeoutError:
            error = ProviderTimeout(f"{m.config.provider} {m.config.model}: no answer within {timeout:g} s")
        except Exception as e:  # the provider is third-party code: its failure is this model's, not the router's
            error = BadResponse(f"{m.config.provider} {m.config.model}: the provider failed with {type(e).__name__}")
            error.__cause__ = e
        else:
            self._record(run, m, "ok", self._now() - started, answer)
            return answer
        self._record(run, m, result_label(error), self._now() - started, None)
        m.breaker.failure()
        if error.retry_after is not None and error.retry_after > self._config.retry.max_retry_after_seconds:
            m.breaker.cool_down(error.retry_after)  # not asked again, by this plan or another, before then
        raise error

    def _request(self, run: _Run, messages: tuple[ChatMessage, ...], *, max_tokens: int) -> Request:
        redacted = tuple(ChatMessage(role=m.role, content=self._redactor.text(m.content)) for m in messages)
        return Request(messages=redacted, tool=run.tool, max_tokens=max_tokens)

    def _record(self, run: _Run, m: _Model, result: str, seconds: float, answer: Answer | None) -> None:
        input_tokens = answer.input_tokens if answer is not None else 0
        output_tokens = answer.output_tokens if answer is not None else 0
        cost = m.config.cost(input_tokens, output_tokens)
        run.tokens += input_tokens + output_tokens
        self._budget.charge(cost)
        attempt = Attempt(m.tier, m.config.provider, m.config.model, result, input_tokens, output_tokens, cost, seconds)
        run.attempts.append(attempt)
        self._events.request(
            provider=m.config.provider,
            model=m.config.model,
            tier=m.tier.value,
            result=result,
            seconds=seconds,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
        )
        log.debug("llm.call", provider=m.config.provider, model=m.config.model, tier=m.tier.value, result=result)

    def _judge(
        self, run: _Run, answer: Answer, validate: Callable[[dict[str, JsonValue]], T]
    ) -> _Valid[T] | InvalidAnswer:
        if answer.arguments is None:
            rejection = InvalidAnswer("no_tool_call", answer.problem or f"the model did not call {run.tool.name}")
        else:
            try:
                return _Valid(validate(answer.arguments))
            except InvalidAnswer as e:
                rejection = e
        self._events.rejected(rejection.reason)
        run.attempts[-1] = replace(run.attempts[-1], rejection=rejection.reason)
        run.last_rejection = rejection.message
        return rejection

    @staticmethod
    def _repair(tool: ToolSpec, answer: Answer, rejection: InvalidAnswer) -> tuple[ChatMessage, ChatMessage]:
        """The model's answer as it gave it, and what was wrong with it (redacted when the request is built)."""
        if answer.arguments is not None:
            said = f"{tool.name}({json.dumps(answer.arguments, ensure_ascii=False)})"
        else:
            said = answer.text or "(no function call)"
        message = rejection.message.rstrip(". ") or rejection.reason
        return (
            ChatMessage(role="assistant", content=said),
            ChatMessage(role="user", content=REPAIR_PROMPT.format(message=message, tool=tool.name)),
        )


def _sdk_provider(config: ModelConfig, *, api_key: str | None) -> ChatProvider:
    """`llm_router.providers.build_provider`, imported on first use: a router with no models loads no SDK."""
    from llm_router.providers import build_provider

    return build_provider(config, api_key=api_key)


def build_router(
    config: LlmConfig,
    *,
    events: RouterEvents = _NO_EVENTS,
    redactor: Redactor | None = None,
    build_provider: ProviderFactory = _sdk_provider,
) -> Router:
    """The router for `config`: every model's key read (ValueError naming `llm.tiers.<tier>.<i>` when it is
    missing) and added to the redactor's literals, every provider built once.

    `redactor` defaults to one with `config.redact_keys`; `build_provider` to the SDK adapters of
    `llm_router.providers`. The router's `redactor` property is the one with the keys: use it for prompts and logs.
    """
    keys: list[str] = []
    providers: dict[Tier, list[tuple[ModelConfig, ChatProvider]]] = {}
    for tier in Tier:
        for index, model in enumerate(config.tiers.models(tier)):
            key = read_api_key(model, where=f"llm.tiers.{tier.value}.{index}")
            if key is not None:
                keys.append(key)
            providers.setdefault(tier, []).append((model, build_provider(model, api_key=key)))
    base = redactor if redactor is not None else Redactor(config.redact_keys)
    return Router(config=config, providers=providers, events=events, redactor=base.with_literals(keys))
