"""Typed requests, completions, tiers and the provider protocol."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class Tier(StrEnum):
    SMALL = "small"
    STANDARD = "standard"
    LARGE = "large"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class CompletionRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    messages: tuple[ChatMessage, ...]
    output_schema: dict[str, JsonValue] | None = Field(
        default=None, description="JSON schema the answer must satisfy (structured output)."
    )
    complexity: float = Field(default=0.5, ge=0.0, le=1.0)
    max_tokens: int = Field(default=2048, gt=0)


class Completion(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    provider: str
    model: str
    tier: Tier
    input_tokens: int = 0
    output_tokens: int = 0


class ChatProvider(Protocol):
    """One model behind one provider SDK."""

    name: str
    model: str

    async def complete(self, request: CompletionRequest, *, tier: Tier) -> Completion: ...
