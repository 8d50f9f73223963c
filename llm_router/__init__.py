"""The language-model router: providers, complexity routing, fallback, retries, rate limits, budgets.

An agent that needs judgement gives the router messages, the one function
the model must answer by calling (`submit_plan`), a starting tier and a
validator. The router picks a model (the first healthy one in the tier),
retries and falls back on errors, gives an invalid answer one repair turn,
then escalates a tier, and charges every call to the budget. Only this
package imports the model SDKs.

    router = build_router(settings.llm, events=metrics)
    tier = router.tier_for(score(features).total)
    solved = await router.solve(messages=..., tool=SUBMIT_PLAN, tier=tier, validate=check_plan)
    solved.value, solved.planner  # "llm:standard:openai/gpt-4o-mini"

Modules: `router` (solve), `complexity` (score, tier_for), `redact`,
`breaker`, `budget`, `limits`, and `providers` (one adapter per SDK).
"""

from llm_router.breaker import BreakerState, CircuitBreaker
from llm_router.budget import Budget
from llm_router.complexity import Contribution, Features, Score, score, tier_for
from llm_router.config import DEFAULT_REDACT_KEYS, LlmConfig, ModelConfig
from llm_router.errors import (
    BudgetSpent,
    InvalidAnswer,
    NoModelAnswered,
    NoValidAnswer,
    ProviderError,
    RoutingError,
)
from llm_router.events import NoEvents, RouterEvents
from llm_router.interfaces import Answer, ChatMessage, ChatProvider, Request, Tier, ToolSpec
from llm_router.limits import RateLimits
from llm_router.redact import REDACTED, Redactor
from llm_router.router import Attempt, ProviderFactory, Router, Solved, build_router

__all__ = [
    "DEFAULT_REDACT_KEYS",
    "REDACTED",
    "Answer",
    "Attempt",
    "BreakerState",
    "Budget",
    "BudgetSpent",
    "ChatMessage",
    "ChatProvider",
    "CircuitBreaker",
    "Contribution",
    "Features",
    "InvalidAnswer",
    "LlmConfig",
    "ModelConfig",
    "NoEvents",
    "NoModelAnswered",
    "NoValidAnswer",
    "ProviderError",
    "ProviderFactory",
    "RateLimits",
    "Redactor",
    "Request",
    "Router",
    "RouterEvents",
    "RoutingError",
    "Score",
    "Solved",
    "Tier",
    "ToolSpec",
    "build_router",
    "score",
    "tier_for",
]
