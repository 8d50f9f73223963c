"""What the router reports as it works, for metrics: the reconciler's `Metrics` implements `RouterEvents`."""

from __future__ import annotations

from typing import Protocol


class RouterEvents(Protocol):
    def request(
        self,
        *,
        provider: str,
        model: str,
        tier: str,
        result: str,
        seconds: float,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
    ) -> None:
        """One call to one model ended: `result` is ok, rate_limited, server_error, timeout, connection,
        bad_response or rejected (the provider refused the request)."""
        ...

    def rejected(self, reason: str) -> None:
        """An answer was rejected by validation (`InvalidAnswer.reason`)."""
        ...


class NoEvents:
    def request(self, **_: object) -> None:
        return None

    def rejected(self, reason: str) -> None:
        return None
