"""Steps and execution plans.

A plan is frozen once made. Its risk is computed from its steps and never
taken from a planner's say-so. Its content hash covers exactly what an
approver approves (agent, resource, desired revision and steps), so an
approval can be bound to a hash and a changed plan needs a new approval.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, computed_field, model_validator

from plans.resources import ResourceKey
from plans.risk import RiskLevel, max_risk


class Step(BaseModel):
    """One tool call: the tool's name, its parameters and why it is there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tool: str = Field(min_length=1)
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    description: str = ""
    risk: RiskLevel = RiskLevel.READ_ONLY


def new_plan_id() -> str:
    """A unique, time-ordered plan id: 13 hex digits of milliseconds, then 8 random hex digits.

    The random part tells apart plans made in one millisecond; it guards nothing (an approval is bound to the
    plan's hash), so it comes from `random`, seeded from the OS at start, not from `os.urandom`: a system call
    on the event loop at every plan, which lets a busy thread take the GIL from the loop."""
    return f"{time.time_ns() // 1_000_000:013x}-{random.getrandbits(32):08x}"


class ExecutionPlan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_plan_id, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    agent: str
    resource: ResourceKey
    steps: tuple[Step, ...] = ()
    reasoning: str = ""
    desired_revision: int = Field(ge=0)
    planner: str = "rules"

    @model_validator(mode="before")
    @classmethod
    def _drop_stated_risk(cls, data: Any) -> Any:
        # A serialised plan carries its computed risk; it is recomputed, never trusted.
        if isinstance(data, dict) and "risk" in data:
            data = {k: v for k, v in data.items() if k != "risk"}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def risk(self) -> RiskLevel:
        return max_risk(*(step.risk for step in self.steps))

    @property
    def is_empty(self) -> bool:
        return not self.steps

    def content_hash(self) -> str:
        """sha256 over the canonical JSON of agent, resource, desired revision and steps."""
        content = {
            "agent": self.agent,
            "resource": self.resource.model_dump(mode="json"),
            "desired_revision": self.desired_revision,
            "steps": [step.model_dump(mode="json") for step in self.steps],
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
