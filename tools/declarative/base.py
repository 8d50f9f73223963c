"""What every declared tool has besides a `Tool`'s attributes: the kinds it is offered for and where it was defined."""

from __future__ import annotations

from typing import ClassVar

from tools.base import Tool


class DeclaredTool(Tool):
    """A tool defined in YAML. The loader makes one subclass per definition, with the `Tool` class attributes."""

    kinds: ClassVar[frozenset[str]] = frozenset()  # resource kinds whose model planner is offered this tool
    defined_at: str = ""  # "FILE line N" of its name, for errors found after loading
    kinds_at: str = ""  # "FILE line N" of its kinds
