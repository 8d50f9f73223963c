"""A fake of three model APIs on one loopback port, for the real SDK clients to talk to over real HTTP.

`LlmServer` is an aiohttp server on 127.0.0.1 (a free port) with the routes
and payload shapes of:

- `anthropic`, `POST /v1/messages` (give the SDK `server.base_url("anthropic")`): a Message with `tool_use`
  content blocks (`input` an object), `stop_reason` and `usage.input_tokens` / `output_tokens`;
- `openai`, `POST /v1/chat/completions` (`server.base_url("openai")`, which ends in /v1): a
  `chat.completion` with `choices[0].message.tool_calls[].function.arguments` a JSON string, and
  `usage.prompt_tokens` / `completion_tokens`;
- `ollama`, `POST /api/chat` (`server.base_url("ollama")`): a non-streaming chat response, `done: true`,
  `message.tool_calls[].function.arguments` an object, `prompt_eval_count` / `eval_count`.

Script it with a FIFO of replies per API; an empty FIFO answers with that
API's default (`tool_call(DEFAULT_PLAN)` unless changed with `default`):

    server.reply("openai", tool_call({"reasoning": "r", "steps": []}, input_tokens=120, output_tokens=30))
    server.reply("anthropic", error(429, headers={"retry-after": "2"}), tool_call(PLAN))   # two calls
    server.reply("ollama", delay(30))            # answers after 30 s (or when the server closes)
    server.reply("openai", raw(b"{not json"))    # 200 with a malformed body
    server.default("anthropic", text("no tool today"))

Replies (module functions, each a frozen dataclass):

- `tool_call(arguments, *, name="submit_plan", text="", input_tokens=12, output_tokens=34)`: one function
  call; `arguments` is any JSON value, put where the API puts it (JSON-encoded for OpenAI); a `str` is sent
  as it is, unencoded (a broken model's arguments). `tool_calls([(name, arguments), ...])` for several.
- `text(content, *, input_tokens=12, output_tokens=34)`: an answer with no function call.
- `error(status, *, headers=None, body=None)`: that status with the API's error body (or `body`: any JSON
  value, or `str`/`bytes` sent as they are) and the extra headers, e.g. `error(429, headers={"Retry-After": "2"})`.
- `delay(seconds, then=None)`: answers `then` (or the default) after `seconds`; closing the server ends the
  wait, so a test that times out before the delay does not wait for it at teardown.
- `raw(body, *, status=200, content_type="application/json")`: exactly that body.

Every request is recorded before it is answered, as `Received(api, method, path, headers, body, raw)`
(`headers` with lower-case names, `body` the parsed JSON or None): `server.received` holds all of them in
order, `server.received_by(api)` one API's, `server.last(api)` the latest. A request to an API's route that
lacks what the real API requires (model, messages; Anthropic's max_tokens and user/assistant roles) gets that
API's 400 error instead of the scripted reply, which stays queued.

Use it through the `llm_server` fixture (function-scoped, started and closed for you), or as
`async with LlmServer() as server:`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from aiohttp import web

Api = Literal["anthropic", "openai", "ollama"]
APIS: tuple[Api, ...] = ("anthropic", "openai", "ollama")
ROUTES: dict[Api, str] = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions", "ollama": "/api/chat"}
DEFAULT_PLAN: dict[str, Any] = {"reasoning": "the fake server's default plan", "steps": []}


@dataclass(frozen=True)
class ToolCalls:
    calls: tuple[tuple[str, Any], ...]
    text: str = ""
    input_tokens: int = 12
    output_tokens: int = 34


@dataclass(frozen=True)
class Text:
    content: str
    input_tokens: int = 12
    output_tokens: int = 34


@dataclass(frozen=True)
class Error:
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # None: the API's own error body


@dataclass(frozen=True)
class Delay:
    seconds: float
    then: Reply | None = None


@dataclass(frozen=True)
class Raw:
    body: bytes
    status: int = 200
    content_type: str = "application/json"


Reply = ToolCalls | Text | Error | Delay | Raw


def tool_call(
    arguments: Any, *, name: str = "submit_plan", text: str = "", input_tokens: int = 12, output_tokens: int = 34
) -> ToolCalls:
    return ToolCalls(((name, arguments),), text=text, input_tokens=input_tokens, output_tokens=output_tokens)


def tool_calls(
    calls: Iterable[tuple[str, Any]], *, text: str = "", input_tokens: int = 12, output_tokens: int = 34
) -> ToolCalls:
    return ToolCalls(tuple(calls), text=text, input_tokens=input_tokens, output_tokens=output_tokens)


def text(content: str, *, input_tokens: int = 12, output_tokens: int = 34) -> Text:
    return Text(content, input_tokens=input_tokens, output_tokens=output_tokens)


def error(status: int, *, headers: Mapping[str, str] | None = None, body: Any = None) -> Error:
    return Error(status, dict(headers or {}), body)


def delay(seconds: float, then: Reply | None = None) -> Delay:
    return Delay(seconds, then)


def raw(body: bytes | str, *, status: int = 200, content_type: str = "application/json") -> Raw:
    return Raw(body.encode() if isinstance(body, str) else body, status, content_type)


@dataclass(frozen=True)
class Received:
    api: Api
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, None when it was not JSON
    raw: bytes


class LlmServer:
    """The fake; see the module docstring."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._queues: dict[Api, deque[Reply]] = {api: deque() for api in APIS}
        self._defaults: dict[Api, Reply] = {api: tool_call(DEFAULT_PLAN) for api in APIS}
        self._closing = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- scripting and reading --

    def reply(self, api: Api, *replies: Reply) -> None:
        """Queue replies for `api`'s next requests, in order."""
        self._queues[api].extend(replies)

    def default(self, api: Api, reply: Reply) -> None:
        """What `api` answers once its queue is empty."""
        self._defaults[api] = reply

    def pending(self, api: Api) -> int:
        """Replies still queued for `api`."""
        return len(self._queues[api])

    def received_by(self, api: Api) -> list[Received]:
        return [r for r in self.received if r.api == api]

    def last(self, api: Api) -> Received:
        requests = self.received_by(api)
        assert requests, f"the fake {api} server received no request"
        return requests[-1]

    def base_url(self, api: Api) -> str:
        """What to give the SDK: the root for anthropic and ollama, root + /v1 for openai."""
        return f"{self.url}/v1" if api == "openai" else self.url

    # -- lifecycle --

    async def start(self) -> None:
        app = web.Application()
        for api, route in ROUTES.items():
            app.router.add_post(route, self._handler(api))
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> LlmServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- answering --

    def _handler(self, api: Api) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            body_bytes = await request.read()
            try:
                body = json.loads(body_bytes) if body_bytes else None
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.received.append(Received(api, request.method, request.path, headers, body, body_bytes))
            invalid = _invalid(api, body)
            if invalid is not None:
                return _json(400, _error_body(api, 400, invalid))
            reply = self._queues[api].popleft() if self._queues[api] else self._defaults[api]
            return await self._answer(api, reply, body)

        return handle

    async def _answer(self, api: Api, reply: Reply, body: Any) -> web.StreamResponse:
        if isinstance(reply, Delay):
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=reply.seconds)
                return _json(503, _error_body(api, 503, "the fake server is closing"))
            except TimeoutError:
                return await self._answer(api, reply.then or self._defaults[api], body)
        if isinstance(reply, Raw):
            return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)
        if isinstance(reply, Error):
            if reply.body is None:
                payload: bytes = json.dumps(_error_body(api, reply.status, "scripted error")).encode()
            elif isinstance(reply.body, bytes | str):
                payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
            else:
                payload = json.dumps(reply.body).encode()
            return web.Response(
                status=reply.status, body=payload, content_type="application/json", headers=dict(reply.headers)
            )
        model = body.get("model", "fake") if isinstance(body, dict) else "fake"
        n = next(self._ids)
        if isinstance(reply, Text):
            return _json(200, _render(api, model, n, (), reply.content, reply.input_tokens, reply.output_tokens))
        return _json(200, _render(api, model, n, reply.calls, reply.text, reply.input_tokens, reply.output_tokens))


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json")


def _invalid(api: Api, body: Any) -> str | None:
    """Why the real API would refuse this request body with a 400, or None."""
    if not isinstance(body, dict):
        return "the request body is not a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required"
    if api == "anthropic":
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: field required"
        if any(not isinstance(m, dict) or m.get("role") not in ("user", "assistant") for m in messages):
            return "messages: roles must be user or assistant (the system prompt goes in system)"
    return None


def _error_body(api: Api, status: int, message: str) -> Any:
    if api == "ollama":
        return {"error": message}
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"}
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _render(
    api: Api, model: str, n: int, calls: Sequence[tuple[str, Any]], content: str, tokens_in: int, tokens_out: int
) -> Any:
    if api == "anthropic":
        blocks: list[Any] = [{"type": "text", "text": content}] if content else []
        blocks += [
            {"type": "tool_use", "id": f"toolu_fake{n}_{i}", "name": name, "input": arguments}
            for i, (name, arguments) in enumerate(calls)
        ]
        return {
            "id": f"msg_fake{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": "tool_use" if calls else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
    if api == "openai":
        message: dict[str, Any] = {"role": "assistant", "content": content or None, "refusal": None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": f"call_fake{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                    },
                }
                for i, (name, arguments) in enumerate(calls)
            ]
        return {
            "id": f"chatcmpl-fake{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else "stop"}
            ],
            "usage": {
                "prompt_tokens": tokens_in,
                "completion_tokens": tokens_out,
                "total_tokens": tokens_in + tokens_out,
            },
            "system_fingerprint": "fp_fake",
        }
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        reply["tool_calls"] = [
            {"id": f"call_fake{n}_{i}", "function": {"index": i, "name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(calls)
        ]
    return {
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
        "message": reply,
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": tokens_in,
        "prompt_eval_duration": 200_000,
        "eval_count": tokens_out,
        "eval_duration": 600_000,
    }


@pytest.fixture
async def llm_server() -> AsyncIterator[LlmServer]:
    """A started `LlmServer`, closed after the test."""
    async with LlmServer() as server:
        yield server
