"""The error hierarchy, in one place.

The worker's outcome switch reads the class, not the message: a
`TemporaryError` is retried with per-key backoff (optionally after its own
`delay`), a `PermanentError` is recorded and dropped until the inputs change.
`InvalidResourceError` is the permanent error for a desired value that cannot
be acted on; the resource goes to phase `Invalid` with the error's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from plans.resources import Issue

_MAX_PATH_CHARS = 60  # a path built from a hostile value's keys can be arbitrarily long


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


class PlanningUnavailable(TemporaryError):
    """No plan can be made now, but may be later: the model budget is spent, or no model answers.
    `delay` is when to ask again."""


class PlanningFailed(PermanentError):
    """The planner was asked and gave no usable plan (every answer was rejected); asking again with the same
    inputs will not help."""


class GaveUp(PermanentError):
    """The agent stopped trying on purpose (a process that keeps crashing): the resource is `Failed` with this
    message, and `issue`, when given, is reported on it as `issues/<kind>/<name>/<issue_id>` in the same
    transaction, unless it is open already. The agent says when it tries again (the issue resolved, the value
    changed)."""

    def __init__(self, message: str, *, issue: Issue | None = None, issue_id: str | None = None) -> None:
        super().__init__(message)
        self.issue = issue
        self.issue_id = issue_id


def describe_validation_error(
    error: ValidationError,
    *,
    what: str | None = "field",
    prefix: str = "",
    whole: str = "value",
    unknown: str = "is not allowed",
    explain: Mapping[str, str] | None = None,
    every: bool = False,
) -> str:
    """The problems in `error` as short clauses that name the field, e.g. "field 'spec' is required".

    `what` names what a field is ("field", "parameter"); None gives the bare path
    (`spec.mode`). `prefix` goes before the path, `whole` stands for the value
    itself, `unknown` says what an unexpected field is, and `explain` replaces
    pydantic's message for an error type. Only the first problem unless `every`.
    """
    clauses = []
    for item in error.errors() if every else error.errors()[:1]:
        path = ".".join(str(p) for p in item["loc"])
        if len(path) > _MAX_PATH_CHARS:
            path = path[:_MAX_PATH_CHARS] + "..."
        where = f"{prefix}{path}" if path else whole
        subject = where if what is None else f"{what} {where!r}"
        kind = item["type"]
        if explain is not None and kind in explain:
            clauses.append(f"{subject} {explain[kind]}")
        elif kind == "missing":
            clauses.append(f"{subject} is required")
        elif kind == "extra_forbidden":
            clauses.append(f"{subject} {unknown}")
        else:
            message = item["msg"].removeprefix("Value error, ")  # our validators' own sentences, as written
            clauses.append(f"{subject}: {message}")
    return "; ".join(clauses)
