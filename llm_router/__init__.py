"""The language-model router's interfaces.

Agents that need judgement describe a task (messages, an output schema and a
complexity score); the router picks a tier (small, standard or large) and a
provider for that tier, with fallback, retries, rate limits and budgets.

Only the interfaces exist so far: no provider or router is implemented yet,
and setpoint's built-in agents plan by rules without a model.
"""

from llm_router.interfaces import ChatMessage, ChatProvider, Completion, CompletionRequest, Tier

__all__ = ["ChatMessage", "ChatProvider", "Completion", "CompletionRequest", "Tier"]
