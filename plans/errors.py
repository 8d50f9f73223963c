"""The error hierarchy, in one place.

The worker's outcome switch reads the class, not the message: a
`TemporaryError` is retried with per-key backoff (optionally after its own
`delay`), a `PermanentError` is recorded and dropped until the inputs change.
`InvalidResourceError` is the permanent error for a desired value that cannot
be acted on; the resource goes to phase `Invalid` with the error's message.
"""

from __future__ import annotations

from pydantic import ValidationError


class SetpointError(Exception):
    """Base of every error setpoint raises on purpose."""


class TemporaryError(SetpointError):
    """Worth retrying later; `delay` (seconds) overrides the per-key backoff when set."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(SetpointError):
    """Retrying with the same inputs cannot help."""


class InvalidResourceError(PermanentError):
    """A desired value is malformed or not allowed; the message says what and where."""


class PlanValidationError(PermanentError):
    """A plan step does not match its tool (unknown tool, bad parameters)."""


def describe_validation_error(error: ValidationError, *, whole: str = "value") -> str:
    """The first problem in `error` as one short clause naming the field, e.g. "field 'spec' is required"."""
    item = error.errors()[0]
    where = ".".join(str(p) for p in item["loc"]) or whole
    if item["type"] == "missing":
        return f"field {where!r} is required"
    if item["type"] == "extra_forbidden":
        return f"field {where!r} is not allowed"
    return f"field {where!r}: {item['msg']}"
