"""Agents own resource kinds and turn (desired, actual) into execution plans.

Agents plan; they never execute. The reconciler validates, gates and runs
what they return. Agents and their tools are assembled explicitly at start-up
(`reconciler/assembly.py`); nothing registers itself on import.
"""

from agents.base import (
    Agent,
    AgentRegistry,
    BatchObservingAgent,
    ClaimingAgent,
    DiffingAgent,
    NotifyingAgent,
    ObservingAgent,
    ProbeResult,
    ProbeSchedule,
    ProbingAgent,
    ValidatingAgent,
)

__all__ = [
    "Agent",
    "AgentRegistry",
    "BatchObservingAgent",
    "ClaimingAgent",
    "DiffingAgent",
    "NotifyingAgent",
    "ObservingAgent",
    "ProbeResult",
    "ProbeSchedule",
    "ProbingAgent",
    "ValidatingAgent",
]
