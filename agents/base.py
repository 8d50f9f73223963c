"""The agent protocol and the registry that maps kinds to agents.

An agent plans from a `Snapshot` (the desired value, the revision it was read
at, and what was observed) and builds its plan with `snapshot.plan(...)`, so
every plan names the desired value it was made for. Besides the seed
interface (`reconcile`, `heal`, `plan`, `tools`) an agent implements `retire`,
called when a desired resource is deleted, with a snapshot of the last value
it had: that is the only place the agent can learn what to tear down, since
the desired key itself is gone.

Optional protocols: an `ObservingAgent` observes its resources itself;
a `ClaimingAgent` names the targets a resource manages (a file's path), so
that two resources fighting over one target are both reported, each naming
the other, instead of undoing each other forever. A `ProbingAgent`'s
resources are checks, probed by the runtime on their own schedule, whose
failures become issues on another resource (their target). A
`NotifyingAgent` says when one of its resources changed (a supervised
process exited), so it is reconciled at once instead of at the next poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import aiohttp
from pydantic import JsonValue

from plans import ExecutionPlan, Issue, Resource, ResourceKey, Snapshot
from tools import Tool


class Agent(Protocol):
    name: str
    kinds: frozenset[str]

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        """A plan that moves actual to desired; an empty plan when they already match."""
        ...

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        """A plan that removes what `snapshot.desired` (the deleted value) had created."""
        ...

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        """A plan that addresses a reported issue."""
        ...

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        """What `reconcile` would do; never executes anything."""
        ...

    def tools(self) -> Sequence[Tool]: ...


@runtime_checkable
class ObservingAgent(Protocol):
    """An agent that can observe the actual state of its resources itself."""

    async def observe(self, desired: Resource) -> dict[str, JsonValue]:
        """The current actual state of `desired`, as stored under `actual/<kind>/<name>` `state`."""
        ...


@runtime_checkable
class BatchObservingAgent(Protocol):
    """An observing agent that can observe many resources in one go (a poll pass over tens of thousands), far
    cheaper than one `observe` each: one thread hop for all of them, not one per resource."""

    async def observe_many(self, desired: Sequence[Resource]) -> list[dict[str, JsonValue] | Exception]:
        """For each of `desired`, in order, its actual state as `observe` gives it, or the exception `observe`
        would raise."""
        ...


@runtime_checkable
class ValidatingAgent(Protocol):
    """An agent that can tell, before anything is written, that a desired value can never work."""

    def validate(self, desired: Resource) -> None:
        """Raise InvalidResourceError naming what is wrong with `desired`, as the daemon would."""
        ...


@runtime_checkable
class DiffingAgent(Protocol):
    """An agent that can show what a plan would change, for `setpoint plan`."""

    async def diff(self, snapshot: Snapshot) -> str:
        """A human-readable diff from what the resource is to what `snapshot.desired` wants ("" when none)."""
        ...


@runtime_checkable
class ClaimingAgent(Protocol):
    """An agent whose resources manage targets that only one resource may own."""

    def claims(self, desired: Resource) -> frozenset[str]:
        """The targets `desired` manages, unique across agents (say "file:/etc/motd"); pure, no I/O.
        Empty when the value is not valid enough to tell."""
        ...


class AgentRegistry:
    """Agents by the kinds they own; each kind has exactly one owner."""

    def __init__(self, agents: Iterable[Agent] = ()) -> None:
        self._by_kind: dict[str, Agent] = {}
        self._agents: list[Agent] = []
        for agent in agents:
            self.register(agent)

    def register(self, agent: Agent) -> None:
        for kind in agent.kinds:
            owner = self._by_kind.get(kind)
            if owner is not None:
                raise ValueError(f"kind {kind!r} is owned by both agent {owner.name!r} and {agent.name!r}")
        for kind in agent.kinds:
            self._by_kind[kind] = agent
        self._agents.append(agent)

    def for_kind(self, kind: str) -> Agent | None:
        return self._by_kind.get(kind)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    def __iter__(self) -> Iterator[Agent]:
        return iter(self._agents)

    def tools(self) -> list[Tool]:
        return [tool for agent in self._agents for tool in agent.tools()]


@dataclass(frozen=True, slots=True)
class ProbeSchedule:
    """How the runtime probes one check resource, read from its valid desired value."""

    target: ResourceKey  # the resource a failing check reports its issue on
    interval_seconds: float
    timeout_seconds: float  # what one probe may take; the runtime allows it a little more before giving up
    failure_threshold: int  # failures in a row before the issue is reported
    what: str  # what is probed, for summaries and logs ("GET http://127.0.0.1:8080/")
    details: Mapping[str, JsonValue] = field(default_factory=dict)  # the same, as data for the issue's details


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome. `state` holds only what changes when the outcome does (no latency), so the runtime can
    write the check's observation only when it changed."""

    ok: bool
    outcome: str  # what happened, short and stable ("returned 500", "did not answer within 5 s")
    state: Mapping[str, JsonValue]  # in the issue's details as is, in the check's `actual/` state as `last_<name>`
    latency_seconds: float


@runtime_checkable
class ProbingAgent(Protocol):
    """An agent whose resources are probed by the runtime (reconciler/probes.py), not observed on reconcile: a
    failure counts only as one of a run of consecutive probes, which only a steady schedule can tell."""

    def schedule(self, desired: Resource) -> ProbeSchedule:
        """How to probe `desired`; InvalidResourceError when it cannot be probed. Pure, no I/O."""
        ...

    async def probe(self, desired: Resource, *, session: aiohttp.ClientSession) -> ProbeResult:
        """Probe `desired` once through `session` (shared, owned by the runtime). Never raises for anything the
        probed endpoint does (refused, hung, hostile): that is a failed result."""


@runtime_checkable
class NotifyingAgent(Protocol):
    """An agent that learns of changes itself, faster than a poll would (a supervised process exited)."""

    def subscribe(self, notify: Callable[[ResourceKey], None]) -> None:
        """Call `notify(key)`, on the event loop, whenever resource `key` may have changed. A later call replaces
        the earlier `notify`: the daemon subscribes each runtime it builds, and only the latest may hear."""
        ...
