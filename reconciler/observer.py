"""Observers write `actual/<kind>/<name>` for agents that can observe their own resources.

Each observing agent's resources are observed at start, after every executed
plan (the controller calls `observe_now`) and on the agent's poll interval,
so hand edits are found. An observation is written only when the state
differs from what the cache holds, so an unchanged file costs no etcd write;
`observed_at` is therefore the time the current state was first seen.

The observer also knows which resources have drifted: the controller marks
the state each resource converged to as its baseline, and every poll pass
recomputes, for the whole kind and before it writes anything, the set of
resources whose state no longer matches their baseline. That set is what
the max-unhealthy pause counts; because it is complete before the first
reconcile the pass triggers, a mass failure is seen as one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime

import structlog
from pydantic import JsonValue

from agents import AgentRegistry, ObservingAgent
from plans import InvalidResourceError, Observed, Resource, ResourceKey
from reconciler.cache import Cache
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore, StoreUnavailableError

log = structlog.get_logger("setpoint.observer")


class Observer:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        agents: AgentRegistry,
        poll_seconds: Mapping[str, float],
    ) -> None:
        self._store = store
        self._keys = keys
        self._cache = cache
        self._agents = agents
        self._poll = dict(poll_seconds)
        self._baseline: dict[ResourceKey, dict[str, JsonValue]] = {}
        self._drifted: dict[str, set[ResourceKey]] = {}

    def mark_converged(self, key: ResourceKey, state: dict[str, JsonValue] | None) -> None:
        """`state` is what `key` looks like when it is at its desired state."""
        if state is None:
            self._baseline.pop(key, None)
        else:
            self._baseline[key] = state
        self._drifted.get(key.kind, set()).discard(key)

    def drifted(self, kind: str) -> frozenset[ResourceKey]:
        """Resources of `kind` that, at the last poll pass, had drifted from the state they converged to."""
        return frozenset(self._drifted.get(kind, ()))

    def observing_agent(self, kind: str) -> ObservingAgent | None:
        agent = self._agents.for_kind(kind)
        return agent if isinstance(agent, ObservingAgent) else None

    async def observe_now(self, resource: Resource) -> Observed | None:
        """Observe `resource` and write the result if it changed; None when the agent cannot observe it."""
        agent = self.observing_agent(resource.kind)
        if agent is None:
            return None
        state = await agent.observe(resource)
        return await self._record(resource.key, state)

    async def _record(self, key: ResourceKey, state: dict[str, JsonValue]) -> Observed:
        cached = self._cache.actual.get(key)
        if cached is not None and cached.observed is not None and cached.observed.state == state:
            return cached.observed
        observed = Observed(kind=key.kind, name=key.name, state=state, observed_at=datetime.now(UTC))
        await self._store.put(self._keys.actual(key), json.dumps(observed.model_dump(mode="json")).encode())
        return observed

    async def forget(self, key: ResourceKey) -> None:
        """Delete the observation of a resource that no longer exists."""
        self.mark_converged(key, None)
        await self._store.delete(self._keys.actual(key))

    async def run(self) -> None:
        """Poll every observing kind on its interval until cancelled (idle when there is none)."""
        loops = [
            self._poll_kind(kind, interval)
            for kind, interval in self._poll.items()
            if self.observing_agent(kind) is not None
        ]
        if not loops:
            await asyncio.Event().wait()
        await asyncio.gather(*loops)

    async def _poll_kind(self, kind: str, interval: float) -> None:
        agent = self.observing_agent(kind)
        assert agent is not None
        while True:
            observed: dict[ResourceKey, dict[str, JsonValue]] = {}
            for entry in list(self._cache.desired.values()):
                if entry.key.kind != kind or entry.resource is None or entry.error or entry.deleted:
                    continue
                try:
                    observed[entry.key] = await agent.observe(entry.resource)
                except InvalidResourceError:
                    pass  # the controller reports it as Invalid
                except OSError as e:
                    log.warning("observe.failed", key=str(entry.key), error=str(e))
            self._drifted[kind] = {
                key for key, state in observed.items() if key in self._baseline and self._baseline[key] != state
            }
            try:
                for key, state in observed.items():
                    await self._record(key, state)
            except StoreUnavailableError as e:
                log.warning("observe.unavailable", error=str(e))
            await asyncio.sleep(interval)
