"""The provider adapters, each with its real SDK client talking HTTP to the fake APIs in tests/llm_fakes.py.

Every behaviour runs for anthropic, openai, ollama and langchain (ChatOpenAI
from langchain-openai against the fake OpenAI route): a tool call parsed
into an Answer with tokens, 429 with Retry-After, 500, a timeout, malformed
JSON, no call, arguments that are not a JSON object, another function; the
key only in the auth header and never in an error. Then what is particular
to each (request shapes, keys, base URLs, the LangChain factory), and the
shared parsing of statuses and Retry-After.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from llm_fakes import Api, LlmServer, delay, error, raw, text, tool_call, tool_calls

from llm_router.config import ModelConfig
from llm_router.errors import (
    BadResponse,
    ConnectionFailed,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RequestRejected,
    ServerError,
)
from llm_router.interfaces import ChatMessage, ChatProvider, Request, ToolSpec
from llm_router.providers import LANGCHAIN_MISSING, build_provider
from llm_router.providers._common import Call, answer, retry_after, status_error
from llm_router.providers.langchain import LangChainProvider

KEY = "sk-canary-key-5b0e7c1d9a"
PROMPT_CANARY = "prompt-canary-3f9d"
PLAN: dict[str, Any] = {
    "reasoning": "the file drifted; write it back",
    "steps": [{"tool": "write_file", "parameters": {"path": "/srv/app.conf"}, "description": "restore", "risk": "low"}],
}
TOOL = ToolSpec(
    name="submit_plan",
    description="Submit the plan.",
    parameters={
        "type": "object",
        "properties": {"reasoning": {"type": "string"}, "steps": {"type": "array", "items": {"type": "object"}}},
        "required": ["reasoning", "steps"],
    },
)
REQUEST = Request(
    messages=(
        ChatMessage(role="system", content="You plan repairs. Answer by calling submit_plan."),
        ChatMessage(role="user", content=f"The file /srv/app.conf drifted. {PROMPT_CANARY}"),
    ),
    tool=TOOL,
    max_tokens=512,
)
PROVIDERS = ["anthropic", "openai", "ollama", "langchain"]
API: dict[str, Api] = {"anthropic": "anthropic", "openai": "openai", "ollama": "ollama", "langchain": "openai"}
MODEL = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4o-mini", "ollama": "qwen2.5:7b", "langchain": "gpt-4o-mini"}
SHORT = 0.2  # the timeout for calls the fake delays; nothing asserts on how long anything took


def config(name: str, base_url: str | None) -> ModelConfig:
    factory = "langchain_openai:ChatOpenAI" if name == "langchain" else None
    return ModelConfig(provider=name, model=MODEL[name], base_url=base_url, factory=factory)  # type: ignore[arg-type]


@dataclass
class Target:
    name: str
    api: Api
    provider: ChatProvider
    server: LlmServer

    @property
    def who(self) -> str:
        return f"{self.name} {MODEL[self.name]}"

    async def ask(self, *replies: Any, timeout: float = 5.0) -> Any:
        self.server.reply(self.api, *replies)
        return await self.provider.ask(REQUEST, timeout=timeout)

    async def fail(self, *replies: Any, timeout: float = 5.0) -> ProviderError:
        with pytest.raises(ProviderError) as caught:
            await self.ask(*replies, timeout=timeout)
        return caught.value


async def close(provider: ChatProvider) -> None:
    await provider.aclose()  # type: ignore[attr-defined]  # every adapter has one; the protocol does not


@pytest.fixture(params=PROVIDERS)
async def target(request: pytest.FixtureRequest, llm_server: LlmServer) -> AsyncIterator[Target]:
    name: str = request.param
    provider = build_provider(config(name, llm_server.base_url(API[name])), api_key=KEY)
    yield Target(name, API[name], provider, llm_server)
    await close(provider)


# -- every provider --


async def test_a_tool_call_is_the_answer_with_its_tokens(target: Target) -> None:
    answer = await target.ask(tool_call(PLAN, input_tokens=321, output_tokens=45))
    assert answer.arguments == PLAN
    assert answer.problem is None
    assert (answer.input_tokens, answer.output_tokens) == (321, 45)
    assert target.provider.provider == target.name
    assert target.provider.model == MODEL[target.name]
    assert len(target.server.received) == 1


async def test_text_besides_the_call_is_kept(target: Target) -> None:
    answer = await target.ask(tool_call(PLAN, text="Restoring the file."))
    assert answer.arguments == PLAN
    assert answer.text == "Restoring the file."


async def test_429_is_rate_limited_with_retry_after_and_not_retried_by_the_sdk(target: Target) -> None:
    failure = await target.fail(error(429, headers={"Retry-After": "2"}))
    assert isinstance(failure, RateLimited)
    assert failure.retryable
    assert failure.status == 429
    assert failure.retry_after == 2.0
    assert str(failure) == f"{target.who}: HTTP 429 (rate limited)"
    assert len(target.server.received) == 1


async def test_retry_after_ms_is_read_first(target: Target) -> None:
    failure = await target.fail(error(429, headers={"retry-after-ms": "1500", "Retry-After": "9"}))
    assert isinstance(failure, RateLimited)
    assert failure.retry_after == 1.5


async def test_429_without_retry_after_has_none(target: Target) -> None:
    failure = await target.fail(error(429))
    assert isinstance(failure, RateLimited)
    assert failure.retry_after is None


async def test_500_is_a_server_error_and_not_retried_by_the_sdk(target: Target) -> None:
    failure = await target.fail(error(500))
    assert isinstance(failure, ServerError)
    assert failure.retryable
    assert failure.status == 500
    assert str(failure) == f"{target.who}: HTTP 500 (internal server error)"
    assert len(target.server.received) == 1


async def test_other_4xx_is_rejected_and_not_retryable(target: Target) -> None:
    failure = await target.fail(error(404))
    assert isinstance(failure, RequestRejected)
    assert not failure.retryable
    assert str(failure) == f"{target.who}: HTTP 404 (not found)"


async def test_no_answer_within_the_timeout_is_a_provider_timeout(target: Target) -> None:
    failure = await target.fail(delay(60), timeout=SHORT)
    assert isinstance(failure, ProviderTimeout)
    assert failure.retryable
    assert str(failure) == f"{target.who}: no answer within {SHORT:g} s"


async def test_malformed_json_is_a_bad_response(target: Target) -> None:
    failure = await target.fail(raw(b'{"id": "msg_1", "content": [', content_type="application/json"))
    assert isinstance(failure, BadResponse)
    assert not failure.retryable


async def test_json_that_is_not_the_api_shape_is_a_bad_response(target: Target) -> None:
    failure = await target.fail(raw(b"[1, 2, 3]"))
    assert isinstance(failure, BadResponse)


async def test_no_call_is_no_arguments_with_the_reason_and_the_text(target: Target) -> None:
    answer = await target.ask(text("I would rather not.", input_tokens=7, output_tokens=5))
    assert answer.arguments is None
    assert answer.problem == "the model called no function"
    assert answer.text == "I would rather not."
    assert (answer.input_tokens, answer.output_tokens) == (7, 5)


async def test_another_function_is_no_arguments_and_names_it(target: Target) -> None:
    answer = await target.ask(tool_call({"command": "rm -rf /"}, name="run_shell"))
    assert answer.arguments is None
    assert answer.problem == "the model called unknown function 'run_shell'"


async def test_the_first_call_to_the_tool_is_taken(target: Target) -> None:
    answer = await target.ask(tool_calls([("run_shell", {"command": "id"}), ("submit_plan", PLAN)]))
    assert answer.arguments == PLAN


@pytest.mark.parametrize("arguments", ['{"reasoning": "cut off', "[1, 2]", '"a string"'])
async def test_arguments_that_are_not_a_json_object_are_no_arguments(target: Target, arguments: str) -> None:
    """OpenAI sends arguments as a JSON string, so a broken one arrives as it is. Anthropic's and Ollama's are
    objects on the wire: a string there is not their API's shape. The Anthropic SDK does not check shapes, so it
    reaches the parser; the Ollama client validates the response, so it is a BadResponse. LangChain's OpenAI
    integration keeps arguments that do not parse as an invalid tool call, but fails building its message from
    JSON that parses to something other than an object: a BadResponse too."""
    target.server.reply(target.api, tool_call(arguments))
    if target.name == "ollama" or (target.name == "langchain" and arguments != '{"reasoning": "cut off'):
        with pytest.raises(BadResponse):
            await target.provider.ask(REQUEST, timeout=5.0)
        return
    answer = await target.provider.ask(REQUEST, timeout=5.0)
    assert answer.arguments is None
    assert answer.problem == "the arguments of submit_plan are not a JSON object"


async def test_the_key_goes_only_in_the_auth_header(target: Target) -> None:
    await target.ask(tool_call(PLAN))
    sent = target.server.last(target.api)
    assert KEY.encode() not in sent.raw
    assert {name for name, value in sent.headers.items() if KEY in value} == {"authorization"}
    assert sent.headers["authorization"] == f"Bearer {KEY}"


async def test_errors_carry_neither_the_key_nor_the_prompt(target: Target) -> None:
    echo = f"Incorrect API key provided: {KEY}. You asked: {PROMPT_CANARY}"
    replies = [
        error(401, body={"error": {"message": echo, "type": "authentication_error"}}),
        error(429, body={"error": {"message": echo}}, headers={"Retry-After": "1"}),
        error(500, body=echo),
        raw(echo),
        raw(echo, content_type="text/plain"),
    ]
    for reply in replies:
        failure = await target.fail(reply)
        assert KEY not in str(failure)
        assert PROMPT_CANARY not in str(failure)
        assert failure.__cause__ is None, "the SDK's error (with the body) is not chained"
        assert failure.__context__ is None or failure.__suppress_context__
        assert str(failure).startswith(f"{target.who}: ")


@pytest.mark.parametrize("name", PROVIDERS)
async def test_an_unreachable_server_is_a_connection_failure_naming_host_and_port_only(name: str) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://fake-user:pw-canary@127.0.0.1:{port}" + ("/v1" if API[name] == "openai" else "")
    provider = build_provider(config(name, base_url), api_key=KEY)
    try:
        with pytest.raises(ConnectionFailed) as caught:
            await provider.ask(REQUEST, timeout=5.0)
    finally:
        await close(provider)
    assert str(caught.value) == f"{name} {MODEL[name]}: cannot connect to 127.0.0.1:{port}"
    assert caught.value.retryable


# -- what each API is sent --


async def test_anthropic_gets_the_system_prompt_apart_and_the_tool_forced(llm_server: LlmServer) -> None:
    provider = build_provider(config("anthropic", llm_server.base_url("anthropic")), api_key=KEY)
    await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    sent = llm_server.last("anthropic")
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"]
    body = sent.body
    assert body["model"] == "claude-haiku-4-5"
    assert body["max_tokens"] == 512
    assert body["system"] == REQUEST.messages[0].content
    assert body["messages"] == [{"role": "user", "content": REQUEST.messages[1].content}]
    assert body["tools"] == [{"name": "submit_plan", "description": TOOL.description, "input_schema": TOOL.parameters}]
    assert body["tool_choice"] == {"type": "tool", "name": "submit_plan"}


async def test_anthropic_overloaded_is_a_server_error(llm_server: LlmServer) -> None:
    provider = build_provider(config("anthropic", llm_server.base_url("anthropic")), api_key=KEY)
    llm_server.reply("anthropic", error(529))
    with pytest.raises(ServerError, match=r"HTTP 529 \(server error\)"):
        await provider.ask(REQUEST, timeout=5.0)
    await close(provider)


async def test_a_repair_turn_reaches_anthropic_as_alternating_turns(llm_server: LlmServer) -> None:
    provider = build_provider(config("anthropic", llm_server.base_url("anthropic")), api_key=KEY)
    repair = Request(
        messages=(
            *REQUEST.messages,
            ChatMessage(role="assistant", content='submit_plan({"reasoning": "x"})'),
            ChatMessage(role="user", content="Your answer was rejected: steps is missing."),
        ),
        tool=TOOL,
    )
    answer = await provider.ask(repair, timeout=5.0)
    await close(provider)
    assert answer.arguments is not None
    assert [m["role"] for m in llm_server.last("anthropic").body["messages"]] == ["user", "assistant", "user"]


async def test_openai_compatible_server_gets_max_tokens_and_the_function_forced(llm_server: LlmServer) -> None:
    provider = build_provider(config("openai", llm_server.base_url("openai")), api_key=KEY)
    await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    sent = llm_server.last("openai")
    assert sent.path == "/v1/chat/completions"
    body = sent.body
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in REQUEST.messages]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "submit_plan", "description": TOOL.description, "parameters": TOOL.parameters},
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "submit_plan"}}
    assert body["max_tokens"] == 512
    assert "max_completion_tokens" not in body


async def test_openai_itself_gets_max_completion_tokens(llm_server: LlmServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """No base_url means OpenAI's own API; the SDK's OPENAI_BASE_URL points that at the fake here."""
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url("openai"))
    provider = build_provider(config("openai", None), api_key=KEY)
    answer = await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    assert answer.arguments is not None
    body = llm_server.last("openai").body
    assert body["max_completion_tokens"] == 512
    assert "max_tokens" not in body


async def test_an_openai_compatible_server_needs_no_key(llm_server: LlmServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    provider = build_provider(config("openai", llm_server.base_url("openai")), api_key=None)
    answer = await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    assert answer.arguments is not None
    assert llm_server.last("openai").headers["authorization"] == "Bearer EMPTY"


def completion(message: dict[str, Any]) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "local",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "tool_calls"}],
        }
    )


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            {"tool_calls": [{"id": "c1", "function": {"name": "submit_plan", "arguments": '{"a": 1}'}}]}, id="no-type"
        ),
        pytest.param(
            {
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "submit_plan", "arguments": {"a": 1}}}
                ]
            },
            id="arguments-an-object",
        ),
        pytest.param({"function_call": {"name": "submit_plan", "arguments": '{"a": 1}'}}, id="legacy-function-call"),
    ],
)
async def test_openai_compatible_servers_quirks_are_read(llm_server: LlmServer, message: dict[str, Any]) -> None:
    """What some compatible servers send: no `type` on a call, arguments as an object, or the legacy
    `function_call`; no `usage` either (tokens are then 0)."""
    provider = build_provider(config("openai", llm_server.base_url("openai")), api_key=None)
    llm_server.reply("openai", raw(completion({"content": None, **message})))
    answer = await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    assert answer.arguments == {"a": 1}
    assert (answer.input_tokens, answer.output_tokens) == (0, 0)


async def test_ollama_gets_the_tool_and_the_output_cap(llm_server: LlmServer) -> None:
    provider = build_provider(config("ollama", llm_server.base_url("ollama")), api_key=None)
    await provider.ask(REQUEST, timeout=5.0)
    await close(provider)
    sent = llm_server.last("ollama")
    assert sent.path == "/api/chat"
    assert "authorization" not in sent.headers
    body = sent.body
    assert body["model"] == "qwen2.5:7b"
    assert body["stream"] is False
    assert body["options"] == {"num_predict": 512}
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in REQUEST.messages]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "submit_plan", "description": TOOL.description, "parameters": TOOL.parameters},
        }
    ]


async def test_langchain_binds_the_tool_with_tool_choice(llm_server: LlmServer) -> None:
    provider = build_provider(config("langchain", llm_server.base_url("openai")), api_key=KEY)
    await provider.ask(REQUEST, timeout=5.0)
    body = llm_server.last("openai").body
    assert body["tool_choice"] == {"type": "function", "function": {"name": "submit_plan"}}
    assert [t["function"]["name"] for t in body["tools"]] == ["submit_plan"]
    assert body["model"] == "gpt-4o-mini"


class NoToolChoice(ChatOpenAI):
    """A chat model whose integration refuses tool_choice, as some do."""

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        if tool_choice is not None:
            raise ValueError("tool_choice is not supported")
        return super().bind_tools(tools, **kwargs)


async def test_langchain_binds_without_tool_choice_when_the_model_refuses_it(llm_server: LlmServer) -> None:
    chat_model = NoToolChoice(model="local", base_url=llm_server.base_url("openai"), api_key=KEY, max_retries=0)
    provider = LangChainProvider(model="local", chat_model=chat_model)
    answer = await provider.ask(REQUEST, timeout=5.0)
    assert answer.arguments == {"reasoning": "the fake server's default plan", "steps": []}
    body = llm_server.last("openai").body
    assert "tool_choice" not in body
    assert [t["function"]["name"] for t in body["tools"]] == ["submit_plan"]


# -- building providers --


def test_anthropic_needs_a_key() -> None:
    with pytest.raises(ValueError, match="anthropic claude-haiku-4-5 needs an API key"):
        build_provider(config("anthropic", None), api_key=None)


def test_openai_itself_needs_a_key() -> None:
    with pytest.raises(ValueError, match="openai gpt-4o-mini needs an API key"):
        build_provider(config("openai", None), api_key=None)


def test_langchain_factory_gets_model_options_key_and_base_url_and_no_sdk_retries() -> None:
    model = ModelConfig(
        provider="langchain",
        model="gpt-4o-mini",
        base_url="http://127.0.0.1:9/v1",
        factory="langchain_openai:ChatOpenAI",
        options={"temperature": 0.25},
    )
    provider = build_provider(model, api_key=KEY)
    chat_model = provider._chat_model  # type: ignore[attr-defined]
    assert isinstance(chat_model, ChatOpenAI)
    assert chat_model.model_name == "gpt-4o-mini"
    assert chat_model.temperature == 0.25
    assert chat_model.openai_api_base == "http://127.0.0.1:9/v1"
    assert chat_model.openai_api_key is not None and chat_model.openai_api_key.get_secret_value() == KEY
    assert chat_model.max_retries == 0


def test_langchain_options_may_set_max_retries() -> None:
    model = ModelConfig(
        provider="langchain", model="m", factory="langchain_openai:ChatOpenAI", options={"max_retries": 4}
    )
    provider = build_provider(model, api_key=KEY)
    assert provider._chat_model.max_retries == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        ("no_such_module_x:Chat", {}, "langchain factory no_such_module_x:Chat: cannot import module no_such_module_x"),
        ("langchain_openai:NoSuchChat", {}, "module langchain_openai has no callable NoSuchChat"),
        ("builtins:dict", {}, "langchain factory builtins:dict returned dict, not a BaseChatModel"),
        (
            "langchain_core.language_models.fake_chat_models:FakeListChatModel",
            {"responses": ["x"]},
            "cannot call tools",
        ),
        ("langchain_openai:ChatOpenAI", {"temperature": "very hot"}, "refused its options: temperature"),
    ],
)
def test_a_bad_langchain_factory_is_one_sentence_without_the_key(factory: str, options: Any, message: str) -> None:
    model = ModelConfig(provider="langchain", model="m", factory=factory, options=options)
    with pytest.raises(ValueError) as caught:
        build_provider(model, api_key=KEY)
    assert message in str(caught.value)
    assert KEY not in str(caught.value)
    assert "very hot" not in str(caught.value)


def test_langchain_without_langchain_core_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "llm_router.providers.langchain", raising=False)
    for name in [name for name in sys.modules if name == "langchain_core" or name.startswith("langchain_core.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "langchain_core", None)
    model = ModelConfig(provider="langchain", model="m", factory="langchain_openai:ChatOpenAI")
    with pytest.raises(ValueError) as caught:
        build_provider(model, api_key=KEY)
    assert str(caught.value) == LANGCHAIN_MISSING


# -- shared parsing --


@pytest.mark.parametrize(
    ("status", "kind", "phrase"),
    [
        (400, RequestRejected, "bad request"),
        (401, RequestRejected, "unauthorized"),
        (403, RequestRejected, "forbidden"),
        (404, RequestRejected, "not found"),
        (408, ProviderTimeout, "the server timed out"),
        (413, RequestRejected, "request entity too large"),
        (422, RequestRejected, "unprocessable entity"),
        (429, RateLimited, "rate limited"),
        (500, ServerError, "internal server error"),
        (502, ServerError, "bad gateway"),
        (503, ServerError, "service unavailable"),
        (529, ServerError, "server error"),
        (302, BadResponse, None),
    ],
)
def test_status_errors(status: int, kind: type[ProviderError], phrase: str | None) -> None:
    failure = status_error("openai m", status, {})
    assert type(failure) is kind
    assert failure.status == status
    if phrase is not None:
        assert str(failure) == f"openai m: HTTP {status} ({phrase})"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"RETRY-AFTER-MS": "250"}, 0.25),
        ({"retry-after-ms": "oops", "retry-after": "3"}, 3.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after(headers, now=lambda: now) == seconds


def test_answer_parses_string_arguments_and_counts_tokens_defensively() -> None:
    parsed = answer("submit_plan", [Call("submit_plan", '{"steps": []}')], text="", input_tokens=-3, output_tokens=True)
    assert parsed.arguments == {"steps": []}
    assert (parsed.input_tokens, parsed.output_tokens) == (0, 0)
    long_name = "x" * 100
    unknown = answer("submit_plan", [Call(long_name, {})], text="", input_tokens=None, output_tokens=None)
    assert unknown.problem == f"the model called unknown function '{'x' * 61}...'"
