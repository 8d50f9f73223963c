"""The two errors of declarative tools: one for a user, one for locating a problem inside a definition."""

from __future__ import annotations

Loc = tuple[str | int, ...]


class ToolDefinitionError(ValueError):
    """A tool definition file cannot be used; one sentence naming the file, the line, the tool and the field."""


class Problem(Exception):
    """What is wrong at `loc` (a path inside one tool's definition); the loader adds the file, line and tool."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
