"""What an agent plans from: one consistent view of one resource.

The reconciler takes the snapshot (the desired value and the etcd revision
it was read at, whether it was deleted, what was observed, and the issues open on it) and hands it
to the owning agent. `Snapshot.plan` binds a plan to exactly that resource
and revision, so a plan always says which desired value it was made for and
no one has to patch that in afterwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from plans.model import ExecutionPlan, Step
from plans.resources import Issue, Observed, Resource, ResourceKey


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    desired: Resource = Field(description="The desired value; for a deleted resource, the last one it had.")
    revision: int = Field(ge=0, description="etcd mod_revision of that value (of the deletion, once deleted).")
    deleted: bool = False
    actual: Observed | None = None
    issues: tuple[Issue, ...] = Field(default=(), description="The issues open on the resource, oldest first.")

    @property
    def key(self) -> ResourceKey:
        return self.desired.key

    def actual_fingerprint(self) -> str:
        """sha256 of what was observed (not when): a plan awaiting approval is for exactly this state."""
        state = self.actual.state if self.actual is not None else None
        canonical = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def plan(
        self, *, agent: str, steps: Sequence[Step] = (), reasoning: str = "", planner: str = "rules"
    ) -> ExecutionPlan:
        """A plan for this snapshot's resource at this snapshot's revision."""
        return ExecutionPlan(
            agent=agent,
            resource=self.key,
            steps=tuple(steps),
            reasoning=reasoning,
            desired_revision=self.revision,
            planner=planner,
        )
