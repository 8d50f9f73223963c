"""Start-up assembly: the one place where agents, tools and policies are built from settings.

Nothing registers itself on import; adding an agent means adding it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from policies import PolicySet, RiskCeiling
from reconciler.settings import Settings
from tools import ToolRegistry


@dataclass(frozen=True, slots=True)
class Assembly:
    agents: AgentRegistry
    tools: ToolRegistry
    policies: PolicySet
    poll_seconds: dict[str, float]


def assemble(settings: Settings) -> Assembly:
    file_agent = FileAgent(allowed_roots=settings.agents.file.allowed_roots)
    agents = AgentRegistry([file_agent])
    return Assembly(
        agents=agents,
        tools=ToolRegistry(agents.tools()),
        policies=PolicySet([RiskCeiling(settings.reconciler.max_auto_risk)]),
        poll_seconds={"file": settings.agents.file.poll_seconds},
    )
