"""Schema-validated tools: the only way a plan touches the world.

A tool declares a pydantic parameter model (its JSON schema is what a language
model sees), a risk, whether running it twice is safe, and a timeout. The
registry validates every step of a plan against its tool's model before any
step runs.
"""

from tools.base import CannotUndo, Tool, ToolContext, ToolResult, ToolStatus
from tools.registry import ToolRegistry, ValidatedStep

__all__ = ["CannotUndo", "Tool", "ToolContext", "ToolRegistry", "ToolResult", "ToolStatus", "ValidatedStep"]
