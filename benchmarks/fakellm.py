"""A fake OpenAI-compatible model server for the LLM flapping scenario: it counts calls and answers each with one
fixed `submit_plan` function call, in the payload shape of the real API (`chat.completion` with
`choices[0].message.tool_calls[].function.arguments` a JSON string, and `usage`), so the daemon's real OpenAI SDK
client talks to it over real HTTP."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from aiohttp import web

MODEL = "fake-small"


class FakeModel:
    """`async with FakeModel(plan) as model:`; `model.base_url` is for the SDK, `model.calls` counts requests."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.calls = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeModel:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        n = self.calls
        message = {
            "role": "assistant", "content": None, "refusal": None,
            "tool_calls": [{"id": f"call_fake{n}", "type": "function",
                            "function": {"name": "submit_plan", "arguments": json.dumps(self.plan)}}],
        }  # fmt: skip
        body = {
            "id": f"chatcmpl-fake{n}", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            "system_fingerprint": "fp_fake",
        }  # fmt: skip
        return web.json_response(body)
