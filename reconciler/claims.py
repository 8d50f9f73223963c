"""Which resources claim which targets, so that a target has one owner.

Two resources naming one file would undo each other forever, each plan
"healing" the other's write. Agents that can tell (`ClaimingAgent`) name the
targets a desired value manages; this index, kept up to date on every
change the watch delivers, knows every target's claimants. A live resource
that shares a target with another live one is `Invalid`, and its message
names the other; when one of them lets go, the other is queued again.

A deleted resource (a tombstone, waiting to be torn down) keeps its claims:
if a live resource now claims its target (a rename: `a` deleted, `b` created
for the same file), tearing it down would destroy what the live one wants,
so the tombstone is released without teardown (`successor`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import Agent, AgentRegistry, ClaimingAgent
from plans import ResourceKey
from reconciler.cache import Cache, DesiredEntry


@dataclass(frozen=True, slots=True)
class _Claim:
    revision: int
    targets: frozenset[str]
    live: bool


class ClaimIndex:
    def __init__(self, *, agents: AgentRegistry, cache: Cache) -> None:
        self._agents = agents
        self._cache = cache
        self._claims: dict[ResourceKey, _Claim] = {}
        self._owners: dict[str, set[ResourceKey]] = {}
        # Each agent, and whether it claims: `isinstance` on a runtime Protocol inspects every member of the
        # class, which cost more than the rest of a watch event's path together (29% of the watch's samples).
        self._claiming: dict[int, tuple[Agent, ClaimingAgent | None]] = {}

    def update(self, key: ResourceKey) -> set[ResourceKey]:
        """Re-read `key`'s claims from the cache; the other resources whose conflicts this changed."""
        entry = self._cache.desired.get(key)
        old = self._claims.get(key)
        if entry is not None and old is not None and old.revision == entry.mod_revision:
            return set()  # the value already indexed (an actual/ event, a resync): no need to read it again
        claim = self._claim_of(entry)
        if claim == old:
            return set()
        touched = (old.targets if old is not None else frozenset()) | (claim.targets if claim else frozenset())
        affected = {other for target in touched for other in self._owners.get(target, ()) if other != key}
        if old is not None:
            for target in old.targets:
                self._owners[target].discard(key)
                if not self._owners[target]:
                    del self._owners[target]
            del self._claims[key]
        if claim is not None:  # kept even without targets, so the same value is not read again
            self._claims[key] = claim
            for target in claim.targets:
                self._owners.setdefault(target, set()).add(key)
        return affected

    def rivals(self, key: ResourceKey) -> dict[str, list[ResourceKey]]:
        """For a live resource: each target it shares with other live resources, and those resources."""
        claim = self._claims.get(key)
        if claim is None or not claim.live:
            return {}
        shared = {
            target: sorted((o for o in self._owners[target] if o != key and self._claims[o].live), key=str)
            for target in sorted(claim.targets)
        }
        return {target: others for target, others in shared.items() if others}

    def successor(self, key: ResourceKey) -> ResourceKey | None:
        """For a deleted resource: a live resource that now claims one of its targets."""
        claim = self._claims.get(key)
        if claim is None or claim.live:
            return None
        live = [o for t in claim.targets for o in self._owners[t] if o != key and self._claims[o].live]
        return min(live, key=str) if live else None

    def _claim_of(self, entry: DesiredEntry | None) -> _Claim | None:
        if entry is None or entry.resource is None:
            return None
        agent = self._claimer(entry.key.kind)
        if agent is None:
            return None
        live = entry.valid and not entry.deleted
        return _Claim(entry.mod_revision, agent.claims(entry.resource), live)

    def _claimer(self, kind: str) -> ClaimingAgent | None:
        agent = self._agents.for_kind(kind)
        if agent is None:
            return None
        known = self._claiming.get(id(agent))
        if known is None or known[0] is not agent:  # the agent object is kept, so its id is not reused meanwhile
            known = (agent, agent if isinstance(agent, ClaimingAgent) else None)
            self._claiming[id(agent)] = known
        return known[1]
