"""The `Tool` base class and what a tool returns.

Tool results are data, not exceptions: a tool reports `error` with a text
that says what went wrong precisely enough for an operator (or a model) to
correct the input. Exceptions escaping `execute` are turned into `error`
results by the executor, at the boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plans import ResourceKey, RiskLevel, Step


class CannotUndo(Exception):
    """A call cannot be undone; the message says why (the previous content is too large, not text)."""


class ToolStatus(StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    NO_DATA = "no_data"


class ToolResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    status: ToolStatus
    output: dict[str, JsonValue] = Field(default_factory=dict)
    error: str | None = None
    retryable: bool = Field(
        default=False, description="The error is transient and the call had no effect: calling again is safe."
    )

    @classmethod
    def success(cls, **output: JsonValue) -> ToolResult:
        return cls(status=ToolStatus.SUCCESS, output=output)

    @classmethod
    def failure(cls, error: str, *, retryable: bool = False, **output: JsonValue) -> ToolResult:
        return cls(status=ToolStatus.ERROR, error=error, retryable=retryable, output=output)

    @classmethod
    def no_data(cls, **output: JsonValue) -> ToolResult:
        return cls(status=ToolStatus.NO_DATA, output=output)

    @property
    def ok(self) -> bool:
        return self.status is not ToolStatus.ERROR


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may know about the call it serves."""

    plan_id: str
    resource: ResourceKey
    step_index: int


class Tool(ABC):
    """A named, schema-described action.

    Subclasses set the class attributes and implement `execute`. `parameters`
    must be a pydantic model that forbids extra fields, so a misspelt
    parameter is an error rather than silently ignored.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[type[BaseModel]]
    risk: ClassVar[RiskLevel]
    idempotent: ClassVar[bool]
    timeout_s: ClassVar[float] = 30.0

    @abstractmethod
    async def execute(self, params: BaseModel, ctx: ToolContext) -> ToolResult:
        """Run the tool with already-validated parameters."""

    async def verify(self, params: BaseModel, ctx: ToolContext) -> bool | None:
        """Read-only: has a call with `params` taken effect? True, False, or None when the tool cannot tell.

        Used after a crash to settle a step found `running` whose tool is not
        idempotent. Tools that can check their own effect override this; the
        default answers honestly that it cannot tell.
        """
        return None

    async def inverse(self, params: BaseModel, ctx: ToolContext) -> Step | None:
        """Read-only, just before a call with `params`: the step that would undo it, built from `params` and
        the state it is about to change (the previous content and mode of a file); None when the call will
        change nothing that needs undoing. Raises CannotUndo saying why when it cannot be undone. Used to roll
        back a plan whose later step failed; the default cannot undo anything."""
        raise CannotUndo(f"{self.name} records no inverse")
