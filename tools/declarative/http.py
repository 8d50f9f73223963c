"""`kind: http` tools: one HTTP request built from the step's parameters, with aiohttp.

The URL is the template with each value percent-quoted as one component;
the body, when the definition has one, is its JSON template filled with typed
values and sent as `application/json`. Headers are fixed, and may carry
secrets read from the environment when the definition was loaded
(`templates.Secret`). Redirects are not followed (a 3xx is a status like
any other), so a secret header is never sent to a host the definition does
not name. The response is read up to `MAX_BODY_BYTES`. A status in
`expect_status` is success with `status` and `body`; any other is an error
naming the method, URL, status and the start of the body. Every secret's
value is replaced by `[REDACTED]` in whatever the tool returns, in case a
server echoes a header back. A refused connection is retryable (nothing was
sent); a timeout, a 429 or a 502-504 only for an idempotent tool.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import aiohttp
from pydantic import BaseModel
from yarl import URL

from tools.base import ToolContext, ToolResult
from tools.declarative.base import DeclaredTool
from tools.declarative.templates import Secret, Template, Value, quote_component, render_body

MAX_BODY_BYTES = 64 * 1024
ERROR_BODY_CHARS = 300
_RETRY_STATUSES = frozenset({429, 502, 503, 504})


class HttpTool(DeclaredTool):
    """A declared HTTP call; the class attributes are set per definition (`loader.py`)."""

    def __init__(
        self, *, method: str, url: Template, body: object, has_body: bool, headers: Mapping[str, str | Secret],
        expect: Sequence[tuple[int, int]], timeout_seconds: float, secrets_read: bool,
    ) -> None:  # fmt: skip
        self._method = method
        self._url = url
        self._body = body
        self._has_body = has_body
        self._headers = dict(headers)
        self._expect = tuple(expect)
        self._timeout = timeout_seconds
        self._secrets_read = secrets_read

    def __repr__(self) -> str:
        return f"HttpTool({self.name!r}, {self._method} {self._url.show()})"

    def url(self, params: BaseModel) -> str:
        values: dict[str, Value] = params.model_dump()
        return self._url.render(values, quote_component)

    def body(self, params: BaseModel) -> object:
        return render_body(self._body, params.model_dump()) if self._has_body else None

    def expects(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self._expect)

    @property
    def expected(self) -> str:
        return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in self._expect)

    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        if not self._secrets_read:
            return ToolResult.failure(f"{self.name} was loaded without reading its secrets; it cannot run here")
        url = self.url(params)
        headers = {name: v.reveal() if isinstance(v, Secret) else v for name, v in self._headers.items()}
        data: bytes | None = None
        if self._has_body:
            data = json.dumps(self.body(params), ensure_ascii=False).encode("utf-8")
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "application/json"
        what = f"{self._method} {url}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout)) as session,
                session.request(
                    self._method, URL(url, encoded=True), headers=headers, data=data, allow_redirects=False
                ) as response,
            ):
                raw = await response.content.read(MAX_BODY_BYTES + 1)
                status = response.status
        except aiohttp.ClientConnectorError as e:
            return self._failure(f"{what}: cannot connect: {e.os_error.strerror or e}", retryable=True)
        except TimeoutError:
            return self._failure(f"{what}: no answer within {self._timeout:g} s", retryable=self.idempotent)
        except (aiohttp.ClientError, ValueError) as e:
            return self._failure(f"{what} failed: {type(e).__name__}: {e}")
        truncated = len(raw) > MAX_BODY_BYTES
        text = self._scrub(raw[:MAX_BODY_BYTES].decode("utf-8", "replace"))
        if not self.expects(status):
            start = text.strip()[:ERROR_BODY_CHARS]
            return ToolResult.failure(
                f"{what} answered {status}, expected {self.expected}" + (f": {start}" if start else ""),
                retryable=self.idempotent and status in _RETRY_STATUSES, status=status, body=text, truncated=truncated,
            )  # fmt: skip
        return ToolResult.success(status=status, body=text, truncated=truncated)

    def _failure(self, error: str, *, retryable: bool = False) -> ToolResult:
        return ToolResult.failure(self._scrub(error), retryable=retryable)

    def _scrub(self, text: str) -> str:
        for value in self._headers.values():
            if isinstance(value, Secret):
                text = value.scrub(text)
        return text
