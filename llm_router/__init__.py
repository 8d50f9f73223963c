"""The language-model router: providers, complexity routing, fallback, retries, rate limits, budgets.

An agent that needs judgement gives the router messages, the one function
the model must answer by calling (`submit_plan`), a starting tier and a
validator. The router picks a model (the first healthy one in the tier),
retries and falls back on errors, gives an invalid answer one repair turn,
then escalates a tier, and charges every call to the budget. Only this
package imports the model SDKs.
"""

from llm_router.config import LlmConfig, ModelConfig
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

__all__ = [
    "Answer",
    "BudgetSpent",
    "ChatMessage",
    "ChatProvider",
    "InvalidAnswer",
    "LlmConfig",
    "ModelConfig",
    "NoEvents",
    "NoModelAnswered",
    "NoValidAnswer",
    "ProviderError",
    "Request",
    "RouterEvents",
    "RoutingError",
    "Tier",
    "ToolSpec",
]
