"""OpenAI chat completions through `openai.AsyncOpenAI`, and any OpenAI-compatible server by `base_url`.

The tool is offered as a function and forced with
`tool_choice={"type": "function", "function": {"name": ...}}`; its
arguments come back as a JSON string, which `_common.answer` parses (some
compatible servers send an object; that is taken as it is). A server that
answers with the legacy `function_call` instead of `tool_calls` is read too.

The output cap goes as `max_completion_tokens` to OpenAI itself (its
reasoning models refuse `max_tokens`) and as `max_tokens` to a compatible
server (vLLM, llama.cpp's server, LM Studio, which all read that one).

One client per provider object, with the SDK's retries off: the router
retries. OpenAI itself needs a key; a compatible server may not, and is
then sent the placeholder key `EMPTY` (what vLLM's documentation uses), so
the SDK never falls back to `OPENAI_API_KEY`. The call's timeout goes to the
SDK and also bounds the whole call, since the SDK's is per read.
"""

from __future__ import annotations

import asyncio

import openai
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessage,
    ChatCompletionMessageCustomToolCall,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
)
from openai.types.shared_params import FunctionDefinition

from llm_router.errors import ProviderError
from llm_router.interfaces import Answer, Request
from llm_router.providers._common import Call, answer, malformed, status_error, timed_out, unreachable

NO_KEY = "EMPTY"  # sent to a compatible server when no key is configured


class OpenAIProvider:
    provider = "openai"

    def __init__(self, *, model: str, api_key: str | None, base_url: str | None = None) -> None:
        """`base_url` defaults to the SDK's (`OPENAI_BASE_URL`, else https://api.openai.com/v1); without it,
        `api_key` is required (ValueError)."""
        if api_key is None and base_url is None:
            raise ValueError(f"openai {model} needs an API key: set api_key_env or api_key_file")
        self.model = model
        self._base_url = base_url
        self._who = f"{self.provider} {model}"
        self._client = openai.AsyncOpenAI(api_key=api_key or NO_KEY, base_url=base_url, max_retries=0)

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        messages: list[ChatCompletionMessageParam] = [_message(m.role, m.content) for m in request.messages]
        tool = request.tool
        cap = request.max_tokens
        schema = dict[str, object](tool.parameters)
        function = FunctionDefinition(name=tool.name, description=tool.description, parameters=schema)
        try:
            async with asyncio.timeout(timeout):
                completion = await self._client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    tools=[ChatCompletionFunctionToolParam(type="function", function=function)],
                    tool_choice=ChatCompletionNamedToolChoiceParam(type="function", function={"name": tool.name}),
                    max_completion_tokens=cap if self._base_url is None else openai.omit,
                    max_tokens=cap if self._base_url is not None else openai.omit,
                    timeout=timeout,
                )
        except (TimeoutError, openai.APIError, ValueError) as e:
            # Not chained: the SDK's message carries the response body, which may echo the prompt or the key.
            raise self._failure(e, timeout) from None
        return self._answer(completion, tool.name)

    def _failure(self, error: Exception, timeout: float) -> ProviderError:
        if isinstance(error, TimeoutError | openai.APITimeoutError):
            return timed_out(self._who, timeout)
        if isinstance(error, openai.APIConnectionError):
            return unreachable(self._who, self._base_url)
        if isinstance(error, openai.APIStatusError):
            return status_error(self._who, error.status_code, error.response.headers)
        if isinstance(error, ValueError):
            return malformed(self._who, "a body that is not JSON")
        return malformed(self._who, "not a chat completion")

    def _answer(self, completion: object, tool: str) -> Answer:
        if not isinstance(completion, ChatCompletion):
            raise malformed(self._who, "not a chat completion")
        try:
            choices = list(completion.choices)
            if not choices:
                raise malformed(self._who, "a chat completion without choices")
            message = choices[0].message
            calls = _calls(message)
            text = "\n".join(part for part in (message.content, message.refusal) if isinstance(part, str) and part)
            usage = getattr(completion, "usage", None)
            tokens_in, tokens_out = getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0)
            return answer(tool, calls, text=text, input_tokens=tokens_in, output_tokens=tokens_out)
        except (AttributeError, TypeError):
            raise malformed(self._who, "not a chat completion") from None

    async def aclose(self) -> None:
        """Closes the SDK client's connections."""
        await self._client.close()


def _message(role: str, content: str) -> ChatCompletionMessageParam:
    if role == "system":
        return {"role": "system", "content": content}
    if role == "assistant":
        return {"role": "assistant", "content": content}
    return {"role": "user", "content": content}


def _calls(message: ChatCompletionMessage) -> list[Call]:
    """The message's calls in order. Read by class, not by `type`: some compatible servers leave `type` out,
    and the SDK, which does not validate, still builds a function call from the rest."""
    calls: list[Call] = []
    for call in message.tool_calls or []:
        if isinstance(call, ChatCompletionMessageCustomToolCall):
            calls.append(Call(call.custom.name, call.custom.input))
        else:
            calls.append(Call(call.function.name, call.function.arguments))
    if not calls and message.function_call is not None:  # the legacy single call
        calls.append(Call(message.function_call.name, message.function_call.arguments))
    return calls
