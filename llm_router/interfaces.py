"""What goes to a model and what comes back: tiers, messages, the one tool, the answer, the provider protocol.

A provider adapter (one per SDK, `llm_router/providers/`) turns a `Request`
into that SDK's call with one function the model must call (`submit_plan`),
and the response into an `Answer`: the function's arguments as a JSON
object, or None with the reason when the model called no function, called
another one, or sent arguments that are not a JSON object. A transport
failure raises a `ProviderError` (`llm_router/errors.py`) instead. Nothing
here trusts the answer: validating it is the caller's job.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class Tier(StrEnum):
    SMALL = "small"
    STANDARD = "standard"
    LARGE = "large"

    @property
    def above(self) -> Tier | None:
        """The next tier up, or None above `large`."""
        order = list(Tier)
        index = order.index(self)
        return order[index + 1] if index + 1 < len(order) else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ToolSpec(BaseModel):
    """The one function the model answers by calling: its name, what it is for, and its arguments' JSON schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
    description: str
    parameters: dict[str, JsonValue]


class Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    tool: ToolSpec
    max_tokens: int = Field(default=2048, gt=0, description="Cap on the answer's output tokens.")


class Answer(BaseModel):
    """One model's reply to one request, as received: nothing in it has been checked yet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arguments: dict[str, JsonValue] | None = Field(
        description="The arguments of the model's call to the request's tool; None when there is no such call."
    )
    problem: str | None = Field(
        default=None, description="Why `arguments` is None: no function called, another one, arguments not JSON."
    )
    text: str = Field(default="", description="Any text the model wrote besides the call.")
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class ChatProvider(Protocol):
    """One model behind one provider SDK."""

    provider: str  # "anthropic", "openai", "ollama" or "langchain": the metrics' and planners' label
    model: str

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        """One call, no retries (the router retries); raises ProviderError on any transport failure."""
        ...
