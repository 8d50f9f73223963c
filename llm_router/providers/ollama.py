"""Ollama's `/api/chat` through `ollama.AsyncClient`, non-streaming, with the tool in `tools=`.

Ollama has no way to force a tool: the model is offered the one function
and the system prompt has to ask for it; an answer without a call becomes
`problem="the model called no function"`. Arguments come back as an object.
Ollama reads a subset of JSON schema for a tool (per property: type, items,
description, enum); the client drops the rest before sending, as the server
would. The output cap goes as `options.num_predict`.

The client raises `ollama.ResponseError` for an HTTP error with the status
but without the headers, so a response hook on its httpx client raises
`_HttpStatus` with them first: a 429's `Retry-After` survives. Its transport
errors are httpx's (or `ConnectionError` for a refused connection), and it
has no per-call timeout: the call is bounded by `asyncio.timeout`.

One client per provider object; the Ollama client does not retry. A key,
for a server behind an authenticating proxy or ollama.com, goes as
`Authorization: Bearer`; without one the client itself sends
`OLLAMA_API_KEY` from the environment when that is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import ollama

from llm_router.errors import ProviderError
from llm_router.interfaces import Answer, Request
from llm_router.providers._common import Call, answer, malformed, status_error, timed_out, unreachable


class _HttpStatus(Exception):
    """An HTTP error status with its headers, raised by the response hook before the client drops them."""

    def __init__(self, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers


async def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        raise _HttpStatus(response.status_code, response.headers)


class OllamaProvider:
    provider = "ollama"

    def __init__(self, *, model: str, api_key: str | None = None, base_url: str | None = None) -> None:
        """`base_url` defaults to the client's (`OLLAMA_HOST`, else http://127.0.0.1:11434)."""
        self.model = model
        self._base_url = base_url
        self._who = f"{self.provider} {model}"
        self._client = ollama.AsyncClient(
            host=base_url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            event_hooks={"response": [_raise_for_status]},
        )

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        tool = request.tool
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        tools: list[Mapping[str, Any]] = [
            {
                "type": "function",
                "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
            }
        ]
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.chat(
                    model=self.model,
                    messages=messages,
                    tools=tools,
                    stream=False,
                    options={"num_predict": request.max_tokens},
                )
        except (TimeoutError, _HttpStatus, ollama.ResponseError, ConnectionError, httpx.HTTPError) as e:
            raise self._failure(e, timeout) from None
        except (ValueError, TypeError):
            # JSON that does not decode, or does not validate as a ChatResponse (pydantic's error is a ValueError).
            raise malformed(self._who, "not a chat response of the Ollama API") from None
        return self._answer(response, tool.name)

    def _failure(self, error: Exception, timeout: float) -> ProviderError:
        if isinstance(error, TimeoutError | httpx.TimeoutException):
            return timed_out(self._who, timeout)
        if isinstance(error, _HttpStatus):
            return status_error(self._who, error.status, error.headers)
        if isinstance(error, ollama.ResponseError) and error.status_code >= 400:
            return status_error(self._who, error.status_code, None)
        if isinstance(error, ConnectionError | httpx.TransportError):
            return unreachable(self._who, self._base_url)
        return malformed(self._who, "not a chat response of the Ollama API")

    def _answer(self, response: object, tool: str) -> Answer:
        if not isinstance(response, ollama.ChatResponse):
            raise malformed(self._who, "not a chat response of the Ollama API")
        message = response.message
        calls = [Call(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return answer(
            tool,
            calls,
            text=message.content or "",
            input_tokens=response.prompt_eval_count,
            output_tokens=response.eval_count,
        )

    async def aclose(self) -> None:
        """Closes the client's connections."""
        await self._client.close()  # type: ignore[no-untyped-call]
