"""Errors from providers and the router, in one place.

A `ProviderError` is one failed call to one model: the router reads
`retryable` and `retry_after` (never the message) to decide whether to try
that model again, and any failure counts toward that model's circuit
breaker. Messages are one sentence that names provider, model and what went
wrong (an HTTP status, a timeout), and never carry a key or a request body.

A `RoutingError` is what the caller sees when no plan could be had:
`BudgetSpent` and `NoModelAnswered` are worth trying again later
(`retry_after`); `NoValidAnswer` means every tier answered and every answer
was rejected, so asking again with the same inputs will not help.
"""

from __future__ import annotations


class ProviderError(Exception):
    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RateLimited(ProviderError):
    """HTTP 429; `retry_after` from the Retry-After header when the provider sent one."""

    retryable = True


class ServerError(ProviderError):
    """HTTP 5xx."""

    retryable = True


class ProviderTimeout(ProviderError):
    """No answer within the call's timeout."""

    retryable = True


class ConnectionFailed(ProviderError):
    """The provider could not be reached."""

    retryable = True


class BadResponse(ProviderError):
    """The provider answered with something that is not its API's response shape (malformed JSON, say)."""


class RequestRejected(ProviderError):
    """HTTP 4xx other than 429: a bad key, an unknown model, a request the provider refuses."""


class RoutingError(Exception):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetSpent(RoutingError):
    """The hourly budget is spent; `retry_after` is when enough of it frees up."""


class NoModelAnswered(RoutingError):
    """Every configured model failed or is cooling down; `retry_after` is when the first may be tried again."""


class NoValidAnswer(RoutingError):
    """Every tier answered, and every answer (with its repair turn) was rejected; the message says the last why."""


class InvalidAnswer(Exception):
    """Raised by the caller's validator: the answer is rejected for `reason` (a short label, the metric's),
    and `message` is what the repair turn tells the model."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
