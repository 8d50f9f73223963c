"""What setpoint reconciles: desired resources, observed state and reported issues.

These are the JSON values stored under `desired/`, `actual/` and `issues/`.
Kinds and names are restricted to `[a-z0-9][a-z0-9._-]{0,62}` so that a key
segment can never smuggle a `/` or a `..` into the key space.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def validate_name(value: str, *, what: str) -> str:
    """Return `value` if it is a valid kind or resource name, else raise ValueError naming `what`."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise ValueError(f"{what} {value!r} does not match {NAME_PATTERN.pattern}")
    return value


class ResourceKey(BaseModel):
    """`kind/name`, the identity of a resource and the unit of work in the queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    name: str

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return validate_name(value, what="kind")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, what="name")

    @classmethod
    def parse(cls, text: str) -> ResourceKey:
        """Parse `kind/name`; raises ValueError with the offending text."""
        kind, sep, name = text.partition("/")
        if not sep:
            raise ValueError(f"{text!r} is not of the form KIND/NAME")
        return cls(kind=kind, name=name)

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


class Resource(BaseModel):
    """A desired resource as written under `desired/<kind>/<name>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    name: str
    spec: dict[str, JsonValue]
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return validate_name(value, what="kind")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, what="name")

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(kind=self.kind, name=self.name)


class Observed(BaseModel):
    """Actual state as written under `actual/<kind>/<name>` by an observer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    name: str
    state: dict[str, JsonValue]
    observed_at: datetime

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(kind=self.kind, name=self.name)


class Issue(BaseModel):
    """A reported problem with a resource, under `issues/<kind>/<name>/<id>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    summary: str
    severity: Literal["info", "warning", "critical"] = "warning"
    source: str
    details: dict[str, Any] = Field(default_factory=dict)
