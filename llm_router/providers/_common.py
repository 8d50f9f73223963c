"""What every adapter shares: reading the one function call into an `Answer`, and naming failures.

An adapter lists the function calls it found in a response, in order, as
`Call(name, arguments)`, where `arguments` is what the SDK handed over: a
JSON string (OpenAI and most OpenAI-compatible servers), an object
(Anthropic, Ollama, LangChain) or anything else a broken server sends.
`answer` takes the first call to the request's tool and parses its
arguments; it never raises for what the model said, only records why there
are no arguments in `Answer.problem`.

Failures become `llm_router.errors`, each message one sentence: the
provider, the model and what went wrong (an HTTP status, a deadline, an
unreachable host). Nothing from the response body or the request goes into
a message: a body may echo the prompt or the key. The host named for a
connection failure is its host and port only, so a password in a base URL
stays out too. `Retry-After` is read as the SDKs read it: `retry-after-ms`
first, then `retry-after` in seconds, then as an HTTP date.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from llm_router.errors import (
    BadResponse,
    ConnectionFailed,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RequestRejected,
    ServerError,
)
from llm_router.interfaces import Answer


@dataclass(frozen=True)
class Call:
    """One function call as the SDK returned it; `arguments` is not trusted to be anything in particular."""

    name: str
    arguments: object


def answer(tool: str, calls: Sequence[Call], *, text: str, input_tokens: object, output_tokens: object) -> Answer:
    """The arguments of the first call to `tool`, or None and why; `text` and token counts as given."""
    arguments, problem = _arguments(tool, calls)
    return Answer(
        arguments=arguments,
        problem=problem,
        text=text,
        input_tokens=count(input_tokens),
        output_tokens=count(output_tokens),
    )


def _arguments(tool: str, calls: Sequence[Call]) -> tuple[dict[str, Any] | None, str | None]:
    chosen = next((call for call in calls if call.name == tool), None)
    if chosen is None:
        if calls:
            return None, f"the model called unknown function {_short(calls[0].name)}"
        return None, "the model called no function"
    arguments = chosen.arguments
    if isinstance(arguments, str | bytes):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = None
    if not isinstance(arguments, Mapping) or not all(isinstance(key, str) for key in arguments):
        return None, f"the arguments of {tool} are not a JSON object"
    return dict(arguments), None


def count(value: object) -> int:
    """A token count from a usage field: absent, negative or not an integer counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _short(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:61] + "...")


def status_error(
    who: str, status: int, headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> ProviderError:
    """The error for an HTTP status: 429 RateLimited (with Retry-After), 408 ProviderTimeout, 5xx ServerError,
    other 4xx RequestRejected, anything else BadResponse. `who` is "provider model"."""
    if status == 429:
        return RateLimited(f"{who}: HTTP 429 (rate limited)", status=status, retry_after=retry_after(headers, now=now))
    if status == 408:
        return ProviderTimeout(f"{who}: HTTP 408 (the server timed out)", status=status)
    if 500 <= status <= 599:
        return ServerError(f"{who}: HTTP {status} ({_phrase(status, 'server error')})", status=status)
    if 400 <= status <= 499:
        return RequestRejected(f"{who}: HTTP {status} ({_phrase(status, 'request rejected')})", status=status)
    return BadResponse(f"{who}: HTTP {status} is not a response of its API", status=status)


def _phrase(status: int, fallback: str) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return fallback


def retry_after(headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `retry-after` (seconds or an HTTP date); None without either."""
    if headers is None:
        return None
    milliseconds = _number(_header(headers, "retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = _header(headers, "retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, float(email.utils.mktime_tz(parsed)) - now())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # httpx's headers ignore case already
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return max(0.0, number) if math.isfinite(number) else None


def timed_out(who: str, timeout: float) -> ProviderTimeout:
    return ProviderTimeout(f"{who}: no answer within {timeout:g} s")


def unreachable(who: str, base_url: str | None) -> ConnectionFailed:
    """`base_url` is named by host and port only; None names the SDK's default address."""
    if base_url is None:
        return ConnectionFailed(f"{who}: cannot connect to the provider's default address")
    parts = urlsplit(base_url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return ConnectionFailed(f"{who}: cannot connect to {host}{port}")


def malformed(who: str, what: str) -> BadResponse:
    """`what` says what the response was instead, e.g. "a body that is not JSON"."""
    return BadResponse(f"{who}: the response is {what}")
