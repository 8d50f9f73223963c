"""Anthropic's Messages API through `anthropic.AsyncAnthropic`, the answer forced to one tool use.

The request's system messages go in `system=` (joined by a blank line), the
rest in `messages`; the tool is offered with its JSON schema as
`input_schema` and forced with `tool_choice={"type": "tool", "name": ...}`,
so the answer is a `tool_use` block whose `input` is already an object.

One client per provider object, with the SDK's retries off: the router
retries. The key is always passed explicitly, so the SDK never falls back to
`ANTHROPIC_API_KEY` or a credentials profile on disk; the SDK sends it as
`Authorization: Bearer` (2.x; earlier versions sent `x-api-key`). The call's
timeout goes to the SDK and also bounds the whole call, since the SDK's is
per read.
"""

from __future__ import annotations

import asyncio

import anthropic
from anthropic.types import (
    AssistantMessageParam,
    Message,
    MessageParam,
    TextBlock,
    ToolChoiceToolParam,
    ToolParam,
    ToolUseBlock,
    UserMessageParam,
)

from llm_router.errors import ProviderError
from llm_router.interfaces import Answer, Request
from llm_router.providers._common import Call, answer, malformed, status_error, timed_out, unreachable


class AnthropicProvider:
    provider = "anthropic"

    def __init__(self, *, model: str, api_key: str, base_url: str | None = None) -> None:
        """`base_url` defaults to the SDK's (`ANTHROPIC_BASE_URL`, else https://api.anthropic.com)."""
        self.model = model
        self._base_url = base_url
        self._who = f"{self.provider} {model}"
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        messages = [_message(m.role, m.content) for m in request.messages if m.role != "system"]
        tool = request.tool
        schema = dict[str, object](tool.parameters)
        offered = ToolParam(name=tool.name, description=tool.description, input_schema=schema)
        try:
            async with asyncio.timeout(timeout):
                message = await self._client.messages.create(
                    model=self.model,
                    max_tokens=request.max_tokens,
                    messages=messages,
                    tools=[offered],
                    tool_choice=ToolChoiceToolParam(type="tool", name=tool.name),
                    system=system or anthropic.omit,
                    timeout=timeout,
                )
        except (TimeoutError, anthropic.APIError, ValueError) as e:
            # Not chained: the SDK's message carries the response body, which may echo the prompt or the key.
            raise self._failure(e, timeout) from None
        return self._answer(message, tool.name)

    def _failure(self, error: Exception, timeout: float) -> ProviderError:
        if isinstance(error, TimeoutError | anthropic.APITimeoutError):
            return timed_out(self._who, timeout)
        if isinstance(error, anthropic.APIConnectionError):
            return unreachable(self._who, self._base_url)
        if isinstance(error, anthropic.APIStatusError):
            return status_error(self._who, error.status_code, error.response.headers)
        if isinstance(error, ValueError):
            return malformed(self._who, "a body that is not JSON")
        return malformed(self._who, "not a message of the Messages API")

    def _answer(self, message: object, tool: str) -> Answer:
        if not isinstance(message, Message):
            raise malformed(self._who, "not a message of the Messages API")
        try:
            blocks = list(message.content)
            calls = [Call(b.name, b.input) for b in blocks if isinstance(b, ToolUseBlock)]
            text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
            usage = getattr(message, "usage", None)
            tokens_in, tokens_out = getattr(usage, "input_tokens", 0), getattr(usage, "output_tokens", 0)
            return answer(tool, calls, text=text, input_tokens=tokens_in, output_tokens=tokens_out)
        except (AttributeError, TypeError):
            raise malformed(self._who, "not a message of the Messages API") from None

    async def aclose(self) -> None:
        """Closes the SDK client's connections."""
        await self._client.close()


def _message(role: str, content: str) -> MessageParam:
    if role == "assistant":
        return AssistantMessageParam(role="assistant", content=content)
    return UserMessageParam(role="user", content=content)
