"""Client-side rate limits per provider: requests per minute and tokens per minute, with aiolimiter.

A provider's limits (`llm.providers.<provider>`) are shared by every model
of that provider, as an account's limits are. Each is a leaky bucket
(`aiolimiter.AsyncLimiter`) that holds a minute's worth: a burst up to the
limit goes at once, then calls wait for the bucket to drain. Waiting here
is cheaper than a 429 and a Retry-After, and it keeps one busy key from
starving the others of the provider's quota.

`acquire(provider, tokens_estimate)` waits for one request and for the
estimated tokens. The estimate (`estimate_tokens`) is the request's
characters divided by four plus its `max_tokens`: the output is not known
before the call, so its cap is reserved. An estimate larger than the token
bucket is clipped to the bucket's size, otherwise it could never be
acquired. A limit below one per minute becomes one per `60 / limit` seconds,
since a bucket must hold at least one unit.

The router acquires before every call, retries included, and outside the
call's timeout: waiting for quota is not the model being slow. A provider
with no limits configured never waits.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiolimiter import AsyncLimiter

from llm_router.config import Provider, ProviderLimitConfig
from llm_router.interfaces import Request

MINUTE = 60.0


def estimate_tokens(request: Request) -> int:
    """Characters of every message // 4, plus the answer's `max_tokens`."""
    return sum(len(message.content) for message in request.messages) // 4 + request.max_tokens


def _per_minute(limit: float) -> AsyncLimiter:
    if limit < 1:
        return AsyncLimiter(1, MINUTE / limit)
    return AsyncLimiter(limit, MINUTE)


class RateLimits:
    """The limiters of every provider that has limits. Defaults: none (nothing ever waits)."""

    def __init__(self, providers: Mapping[Provider, ProviderLimitConfig] | None = None) -> None:
        self._requests: dict[str, AsyncLimiter] = {}
        self._tokens: dict[str, AsyncLimiter] = {}
        for provider, limits in (providers or {}).items():
            if limits.requests_per_minute is not None:
                self._requests[provider] = _per_minute(limits.requests_per_minute)
            if limits.tokens_per_minute is not None:
                self._tokens[provider] = _per_minute(limits.tokens_per_minute)

    async def acquire(self, provider: str, tokens_estimate: int) -> None:
        """Wait until `provider` may take one more request of about `tokens_estimate` tokens."""
        requests = self._requests.get(provider)
        if requests is not None:
            await requests.acquire(1)
        tokens = self._tokens.get(provider)
        if tokens is not None:
            await tokens.acquire(min(float(max(tokens_estimate, 0)), tokens.max_rate))

    def has_capacity(self, provider: str, tokens_estimate: int) -> bool:
        """Would `acquire` go through without waiting? (For status output and tests; claims nothing.)"""
        requests = self._requests.get(provider)
        if requests is not None and not requests.has_capacity(1):
            return False
        tokens = self._tokens.get(provider)
        return tokens is None or tokens.has_capacity(min(float(max(tokens_estimate, 0)), tokens.max_rate))
