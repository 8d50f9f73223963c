"""The `llm` settings group: models per tier, budgets, rate limits, retries, the circuit breaker, routing.

The reconciler's settings embed `LlmConfig` as `llm`; everything here states
its default. API keys are never settings values: a model names the
environment variable (`api_key_env`) or the file (`api_key_file`) that holds
its key, and `read_api_key` reads it at start-up. Its errors name the
variable or the file, never what is in them.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from llm_router.interfaces import Tier

Provider = Literal["anthropic", "openai", "ollama", "langchain"]

# Keys whose values are redacted wherever they appear in what is sent to a model (globs, case-insensitive).
DEFAULT_REDACT_KEYS = (
    "*password*", "*passwd*", "*secret*", "*token*", "*api_key*", "*apikey*", "*api-key*", "*private_key*",
    "*private-key*", "*credential*", "authorization", "*cookie*", "*session*",
)  # fmt: skip


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Group):
    provider: Provider = Field(description="anthropic, openai (or any OpenAI-compatible server), ollama, langchain.")
    model: str = Field(min_length=1, description="The provider's model name, e.g. claude-haiku-4-5, gpt-4o-mini.")
    base_url: str | None = Field(
        default=None,
        description="The API's base URL: an OpenAI-compatible server (vLLM, llama.cpp, LM Studio) or an Ollama host. "
        "Defaults to the provider's own.",
    )
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key.")
    api_key_file: str | None = Field(default=None, description="File holding the API key.")
    input_usd_per_mtok: float = Field(default=0.0, ge=0, description="USD per million input tokens. Defaults to 0.")
    output_usd_per_mtok: float = Field(default=0.0, ge=0, description="USD per million output tokens. Defaults to 0.")
    timeout_seconds: float = Field(default=60.0, gt=0, description="Deadline for one call. Defaults to 60 s.")
    factory: str | None = Field(
        default=None,
        description="langchain only: `module:callable` returning a BaseChatModel, called with model= and options.",
    )
    options: dict[str, JsonValue] = Field(
        default_factory=dict, description="langchain only: keyword arguments for the factory."
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"base_url {value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.provider == "langchain" and (self.factory is None or ":" not in self.factory):
            raise ValueError("a langchain model needs factory: 'module:callable' (e.g. langchain_openai:ChatOpenAI)")
        if self.provider != "langchain" and (self.factory is not None or self.options):
            raise ValueError("factory and options are for provider langchain only")
        return self

    @property
    def label(self) -> str:
        """`provider/model`, as the planner names it."""
        return f"{self.provider}/{self.model}"

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_usd_per_mtok + output_tokens * self.output_usd_per_mtok) / 1_000_000


class TiersConfig(_Group):
    small: list[ModelConfig] = Field(default_factory=list, description="Tried in order. Defaults to none.")
    standard: list[ModelConfig] = Field(default_factory=list, description="Tried in order. Defaults to none.")
    large: list[ModelConfig] = Field(default_factory=list, description="Tried in order. Defaults to none.")

    def models(self, tier: Tier) -> list[ModelConfig]:
        models: list[ModelConfig] = getattr(self, tier.value)
        return models

    @property
    def configured(self) -> bool:
        return any(self.models(tier) for tier in Tier)


class BudgetConfig(_Group):
    usd_per_hour: float | None = Field(
        default=None, ge=0,
        description="Spend on models in any rolling hour; when spent, model planning stops until it frees up. "
        "Defaults to none: no limit.",
    )  # fmt: skip
    max_tokens_per_plan: int = Field(
        default=50_000, gt=0, description="Input plus output tokens over every call for one plan. Defaults to 50000."
    )


class ProviderLimitConfig(_Group):
    requests_per_minute: float | None = Field(default=None, gt=0, description="Defaults to none: no limit.")
    tokens_per_minute: float | None = Field(default=None, gt=0, description="Defaults to none: no limit.")


class BreakerConfig(_Group):
    failures: int = Field(
        default=3, ge=1, description="Consecutive failed calls that open a model's circuit. Defaults to 3."
    )
    reset_seconds: float = Field(
        default=60.0, gt=0, description="How long an open circuit stays open before one trial call. Defaults to 60 s."
    )


class RetryConfig(_Group):
    attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Calls to one model on 429, 5xx, timeouts, connection errors. Defaults to 3.",
    )
    backoff_base_seconds: float = Field(default=0.5, gt=0, description="Defaults to 0.5 s, doubling, jittered.")
    backoff_max_seconds: float = Field(default=20.0, gt=0, description="Defaults to 20 s.")
    max_retry_after_seconds: float = Field(
        default=60.0, gt=0,
        description="A Retry-After longer than this is not waited for: the next model is tried. Defaults to 60 s.",
    )  # fmt: skip


class RoutingConfig(_Group):
    standard_at: float = Field(default=0.3, ge=0, le=1, description="Scores from here use standard. Defaults to 0.3.")
    large_at: float = Field(default=0.6, ge=0, le=1, description="Scores from here use large. Defaults to 0.6.")

    @model_validator(mode="after")
    def _ordered(self) -> RoutingConfig:
        if self.large_at < self.standard_at:
            raise ValueError("large_at must not be below standard_at")
        return self


class LlmConfig(_Group):
    tiers: TiersConfig = Field(default_factory=TiersConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    providers: dict[Provider, ProviderLimitConfig] = Field(
        default_factory=dict, description="Rate limits per provider. Defaults to none."
    )
    circuit_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    max_output_tokens: int = Field(default=2048, gt=0, description="Cap on one answer. Defaults to 2048.")
    redact_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_KEYS),
        description="Globs (case-insensitive) of keys whose values are redacted before anything is sent to a model.",
    )


def read_api_key(model: ModelConfig, *, where: str) -> str | None:
    """The key for `model` from its environment variable or file (None when it names neither); ValueError
    naming `where` and the variable or file, never the key, when it is not there or is empty."""
    if model.api_key_env is not None:
        value = os.environ.get(model.api_key_env, "").strip()
        if not value:
            raise ValueError(f"{where}: environment variable {model.api_key_env} is not set or empty")
        return value
    if model.api_key_file is not None:
        try:
            with open(model.api_key_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as e:
            raise ValueError(f"{where}: cannot read api_key_file {model.api_key_file}: {e.strerror}") from None
        if not value:
            raise ValueError(f"{where}: api_key_file {model.api_key_file} is empty")
        return value
    return None
