"""Any LangChain chat model (a `BaseChatModel` with `bind_tools`) as a provider.

`load_chat_model` imports the configured factory (`module:callable`), calls
it with `model=` and the configured options (plus `api_key=` / `base_url=`
when set), and requires a `BaseChatModel` that implements `bind_tools`.
When the factory is a model class with a `max_retries` field that the
options leave unset, it is set to 0: the router retries.

Each call binds the request's tool (as an OpenAI-format function, which
every LangChain integration converts) with `tool_choice=<name>`, and binds
it without `tool_choice` when the model raises on that argument (some
integrations cannot force a tool). The model's output cap is the factory's
business (e.g. a `max_tokens` option): LangChain has no argument every
model accepts at call time.

The answer is read from the `AIMessage`: `tool_calls` (arguments already
parsed) and `invalid_tool_calls` (arguments that did not parse, as their raw
string), `usage_metadata` for tokens. Failures are whatever the integration
raises, so they are recognised by shape: a `status_code` (and
`response.headers`) anywhere on the exception or its causes is an HTTP
status; a class named like a timeout or a connection error is one; anything
else is a `BadResponse` naming only the exception's class.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import JsonValue, ValidationError

from llm_router.errors import BadResponse, ProviderError
from llm_router.interfaces import Answer, Request
from llm_router.providers._common import Call, answer, malformed, status_error, timed_out, unreachable


def load_chat_model(
    factory: str, *, model: str, options: Mapping[str, JsonValue], api_key: str | None, base_url: str | None
) -> BaseChatModel:
    """The chat model `factory` makes; ValueError naming the factory (never a key or an option's value)."""
    build = _import(factory)
    kwargs: dict[str, Any] = {"model": model, **options}
    if api_key is not None:
        kwargs["api_key"] = api_key
    if base_url is not None:
        kwargs["base_url"] = base_url
    if isinstance(build, type) and "max_retries" in getattr(build, "model_fields", {}):
        kwargs.setdefault("max_retries", 0)
    try:
        chat_model = build(**kwargs)
    except ValidationError as e:
        fields = ", ".join(sorted({".".join(str(part) for part in error["loc"]) or "?" for error in e.errors()}))
        raise ValueError(f"langchain factory {factory} refused its options: {fields}") from None
    except Exception as e:  # a third party's constructor: its message may hold the key, so only its class
        raise ValueError(f"langchain factory {factory} failed with {type(e).__name__}") from None
    if not isinstance(chat_model, BaseChatModel):
        raise ValueError(f"langchain factory {factory} returned {type(chat_model).__name__}, not a BaseChatModel")
    if type(chat_model).bind_tools is BaseChatModel.bind_tools:
        raise ValueError(f"langchain model {type(chat_model).__name__} from {factory} cannot call tools (bind_tools)")
    return chat_model


def _import(factory: str) -> Callable[..., object]:
    module_name, _, attribute = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f"langchain factory {factory}: cannot import module {module_name}") from None
    build = getattr(module, attribute, None)
    if not callable(build):
        raise ValueError(f"langchain factory {factory}: module {module_name} has no callable {attribute}")
    return build  # type: ignore[no-any-return]


class LangChainProvider:
    provider = "langchain"

    def __init__(self, *, model: str, chat_model: BaseChatModel, base_url: str | None = None) -> None:
        """`model` is the configured model name (the label); `base_url` only names the host in errors."""
        self.model = model
        self._chat_model = chat_model
        self._base_url = base_url
        self._who = f"{self.provider} {model}"

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        tool = request.tool
        function = {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
        }
        try:
            bound = self._chat_model.bind_tools([function], tool_choice=tool.name)
        except (TypeError, ValueError, NotImplementedError):  # LangChain's own "this model cannot force a tool"
            bound = self._chat_model.bind_tools([function])  # the prompt asks for the call; no call is rejected
        messages = [_message(m.role, m.content) for m in request.messages]
        try:
            async with asyncio.timeout(timeout):
                reply = await bound.ainvoke(messages)
        except Exception as e:  # a third party's model: every failure becomes a ProviderError
            raise self._failure(e, timeout) from None
        return self._answer(reply, tool.name)

    def _failure(self, error: BaseException, timeout: float) -> ProviderError:
        if isinstance(error, TimeoutError):
            return timed_out(self._who, timeout)
        for cause in _chain(error):
            status = getattr(cause, "status_code", None)
            if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
                headers = getattr(getattr(cause, "response", None), "headers", None)
                return status_error(self._who, status, headers if isinstance(headers, Mapping) else None)
        for cause in _chain(error):
            names = [kind.__name__.lower() for kind in type(cause).__mro__]
            if any("timeout" in name for name in names):
                return timed_out(self._who, timeout)
            if any("connect" in name for name in names):
                return unreachable(self._who, self._base_url)
        return BadResponse(f"{self._who}: the model's integration raised {type(error).__name__}")

    def _answer(self, reply: object, tool: str) -> Answer:
        if not isinstance(reply, AIMessage):
            raise malformed(self._who, f"{type(reply).__name__}, not an AIMessage")
        calls = [Call(call["name"], call["args"]) for call in reply.tool_calls]
        calls += [Call(call.get("name") or "", call.get("args")) for call in reply.invalid_tool_calls]
        usage = reply.usage_metadata
        return answer(
            tool,
            calls,
            text=str(reply.text),
            input_tokens=usage["input_tokens"] if usage else 0,
            output_tokens=usage["output_tokens"] if usage else 0,
        )

    async def aclose(self) -> None:
        """Nothing to close: the chat model owns its clients."""


def _message(role: str, content: str) -> BaseMessage:
    if role == "system":
        return SystemMessage(content=content)
    if role == "assistant":
        return AIMessage(content=content)
    return HumanMessage(content=content)


def _chain(error: BaseException) -> list[BaseException]:
    """The error and its causes (explicit, then implicit), each once."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen) and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
