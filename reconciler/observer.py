"""Observers write `actual/<kind>/<name>` for agents that can observe their own resources.

Each observing agent's resources are observed at start, before and after
every executed plan, and on the agent's poll interval, so hand edits are
found. An observation is written only when the state differs from what the
cache holds, so an unchanged file costs no etcd write; `observed_at` is when
the state was seen.

An observation is only as fresh as the moment it was taken. A poll pass
observes every resource of a kind before it writes anything, and a plan may
run for one of them in between, which makes what the pass saw of it older
than what the plan saw. So each key has an epoch, moved by every observation
taken outside a pass (`observe`) and by every new baseline; a pass drops
what it saw of a key whose epoch moved meanwhile, and never writes back, or
counts as drifted, a state from before a plan.

The observer also knows which resources have drifted: the runner marks the
state each resource converged to as its baseline, and every poll pass
recomputes, for the whole kind and before it writes anything, the set of
resources whose state no longer matches their baseline. That set is what
the max-unhealthy pause counts; because it is complete before the first
reconcile the pass triggers, a mass failure is seen as one.

A poll pass is a boundary: an agent raising while it observes one resource,
an observation that takes longer than its timeout (a hung mount), or etcd
refusing a write, is logged and costs that observation only; the loop ends
only when cancelled. A reconcile's observation that times out is retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import structlog
from pydantic import JsonValue

from agents import Agent, AgentRegistry, BatchObservingAgent, ObservingAgent
from plans import InvalidResourceError, Observed, Resource, ResourceKey, TemporaryError
from reconciler.cache import Cache, DesiredEntry
from reconciler.keys import KeySpace
from reconciler.store import (
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    Delete,
    EtcdStore,
    Put,
    StoreError,
    StoreUnavailableError,
    request_bytes,
)

log = structlog.get_logger("setpoint.observer")

PASS_CONCURRENCY = 32  # observations a poll pass has under way at once
PASS_CHUNK = 256  # resources a poll pass hands a BatchObservingAgent at once
# Puts per transaction of a pass: the daemon's fence nests it in its own transaction, which takes one of the
# operations etcd allows (--max-txn-ops counts a nested transaction's against what its parent leaves).
PASS_BATCH = MAX_TXN_OPS - 1


class Observer:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        agents: AgentRegistry,
        poll_seconds: Mapping[str, float],
        timeout: float = 30.0,
    ) -> None:
        """`timeout` bounds one observation (defaults to 30 s)."""
        self._timeout = timeout
        self._store = store
        self._keys = keys
        self._cache = cache
        self._agents = agents
        self._poll = dict(poll_seconds)
        self._baseline: dict[ResourceKey, dict[str, JsonValue]] = {}
        self._drifted: dict[str, set[ResourceKey]] = {}
        self._epoch: dict[ResourceKey, int] = {}
        self._observing: dict[str, tuple[Agent | None, ObservingAgent | None]] = {}  # by kind
        # By kind, what the start-up pass saw and left for `run` to write: the epoch each was taken at, and each.
        self._unwritten: dict[str, tuple[dict[ResourceKey, tuple[int, Observed]], dict[ResourceKey, Observed]]] = {}

    def _move_epoch(self, key: ResourceKey) -> None:
        self._epoch[key] = self._epoch.get(key, 0) + 1

    def mark_converged(self, key: ResourceKey, state: dict[str, JsonValue] | None) -> None:
        """`state` is what `key` looks like when it is at its desired state."""
        if state is None:
            self._baseline.pop(key, None)
        else:
            self._baseline[key] = state
        self._drifted.get(key.kind, set()).discard(key)
        self._move_epoch(key)

    def forget(self, key: ResourceKey) -> None:
        """`key` no longer exists: drop its baseline (its actual/ key goes with `delete_op`)."""
        self.mark_converged(key, None)

    def delete_op(self, key: ResourceKey) -> Delete | None:
        """The delete of `key`'s observation, when setpoint is the one observing it."""
        return Delete(self._keys.actual(key)) if self.observing_agent(key.kind) is not None else None

    def drifted(self, kind: str) -> frozenset[ResourceKey]:
        """Resources of `kind` that, at the last poll pass, had drifted from the state they converged to."""
        return frozenset(self._drifted.get(kind, ()))

    def observing_agent(self, kind: str) -> ObservingAgent | None:
        agent = self._agents.for_kind(kind)
        known = self._observing.get(kind)
        if known is None or known[0] is not agent:  # a Protocol's isinstance is slow, and asked often
            known = self._observing[kind] = (agent, agent if isinstance(agent, ObservingAgent) else None)
        return known[1]

    async def observe(self, resource: Resource) -> Observed | None:
        """Observe `resource` now (without writing); None when its agent cannot observe."""
        agent = self.observing_agent(resource.kind)
        if agent is None:
            return None
        self._move_epoch(resource.key)  # what a poll pass saw of it before now is older than this
        state = await self._observe(agent, resource)
        return Observed(kind=resource.kind, name=resource.name, state=state, observed_at=datetime.now(UTC))

    async def _observe(self, agent: ObservingAgent, resource: Resource) -> dict[str, JsonValue]:
        try:
            async with asyncio.timeout(self._timeout):
                return await agent.observe(resource)
        except TimeoutError:
            raise TemporaryError(
                f"observing {resource.key} took longer than {self._timeout:g} s (reconciler.observe_timeout_seconds)"
            ) from None

    def record_put(self, observed: Observed) -> Put | None:
        """The write that records `observed` for the reconcile that acted on it, or None when the cache already
        holds that state. Its event from the watch queues no second reconcile (`Cache.expect_echo`)."""
        put = self._put(observed)
        if put is not None:
            self._cache.expect_echo(observed, put.value)
        return put

    def _put(self, observed: Observed) -> Put | None:
        cached = self._cache.actual.get(observed.key)
        if cached is not None and cached.observed is not None and cached.observed.state == observed.state:
            return None
        return Put(self._keys.actual(observed.key), json.dumps(observed.model_dump(mode="json")).encode())

    async def record(self, observed: Observed) -> None:
        """Write `observed`, which a reconcile acted on, to actual/ unless the cache already holds that state."""
        put = self.record_put(observed)
        if put is not None:
            await self._store.put(put.key, put.value)

    async def poll_all(self, *, write_later: bool = False) -> None:
        """One poll pass over every observing kind (at start-up, before any worker plans). `write_later` (the
        leader's start-up pass, after every key was queued): what drifted is known when this returns, but the
        observations are written by `run`, first thing, while the workers already plan; their echoes from the
        watch queue nothing (every key is queued already), and one a plan observed again meanwhile is dropped."""
        for kind in self._kinds():
            await self._poll_guarded(kind, write_later=write_later)

    async def run(self, *, wait_first: bool = False) -> None:
        """Poll every observing kind on its interval until cancelled (idle when there is none);
        `wait_first` when a pass has just been made (what it left to write is written at once)."""
        loops = [self._poll_kind(kind, self._poll[kind], wait_first=wait_first) for kind in self._kinds()]
        if not loops:
            await asyncio.Event().wait()
        await asyncio.gather(*loops)

    def _kinds(self) -> list[str]:
        return [kind for kind in self._poll if self.observing_agent(kind) is not None]

    async def _poll_kind(self, kind: str, interval: float, *, wait_first: bool) -> None:
        if wait_first:
            left = self._unwritten.pop(kind, None)
            if left is not None:
                await self._write_guarded(kind, *left, echo=False)
            await asyncio.sleep(interval)
        while True:
            await self._poll_guarded(kind)
            await asyncio.sleep(interval)

    async def _poll_guarded(self, kind: str, *, write_later: bool = False) -> None:
        try:
            await self._poll_once(kind, write_later=write_later)
        except Exception as e:  # the pass's boundary: the next pass tries again
            log.error("observe.pass_failed", kind=kind, error_type=type(e).__name__, error=str(e)[:300])

    async def _write_guarded(
        self, kind: str, taken: dict[ResourceKey, tuple[int, Observed]], fresh: dict[ResourceKey, Observed], *,
        echo: bool,
    ) -> None:  # fmt: skip
        try:
            await self._write_pass(taken, fresh, echo=echo)
        except Exception as e:  # the pass's boundary: the next pass tries again
            log.error("observe.pass_failed", kind=kind, error_type=type(e).__name__, error=str(e)[:300])

    async def _poll_once(self, kind: str, *, write_later: bool = False) -> None:
        agent = self.observing_agent(kind)
        assert agent is not None
        taken: dict[ResourceKey, tuple[int, Observed]] = {}

        def took(entry: DesiredEntry, epoch: int, state: dict[str, JsonValue] | Exception) -> None:
            if isinstance(state, InvalidResourceError):
                return  # the reconcile reports it as Invalid
            if isinstance(state, Exception):  # an agent's bug costs this one observation
                error = str(state)[:300]
                log.warning("observe.failed", key=str(entry.key), error_type=type(state).__name__, error=error)
                return
            observed = Observed(kind=kind, name=entry.key.name, state=state, observed_at=datetime.now(UTC))
            taken[entry.key] = (epoch, observed)

        async def take(entry: DesiredEntry, resource: Resource) -> None:
            epoch = self._epoch.get(entry.key, 0)
            try:
                state: dict[str, JsonValue] | Exception = await self._observe(agent, resource)
            except Exception as e:
                state = e
            took(entry, epoch, state)

        async def take_many(chunk: list[tuple[DesiredEntry, Resource]]) -> None:
            assert isinstance(agent, BatchObservingAgent)
            epochs = [self._epoch.get(entry.key, 0) for entry, _ in chunk]
            try:
                async with asyncio.timeout(self._timeout):
                    states = await agent.observe_many([resource for _, resource in chunk])
            except TimeoutError:  # one of them hangs (a mount): each on its own, each with its timeout
                await asyncio.gather(*(take(entry, resource) for entry, resource in chunk))
                return
            for (entry, _), epoch, state in zip(chunk, epochs, states, strict=True):
                took(entry, epoch, state)

        todo = [
            (entry, entry.resource) for entry in list(self._cache.desired.values())
            if entry.key.kind == kind and entry.resource is not None and entry.valid and not entry.deleted
        ]  # fmt: skip
        began = time.perf_counter()
        if isinstance(agent, BatchObservingAgent):
            # Many in one go: at 100,000 files, one thread hop each (32 at a time) took 30 s, one per 256 takes 7.
            for start in range(0, len(todo), PASS_CHUNK):
                await take_many(todo[start : start + PASS_CHUNK])
        else:
            # A few observations at a time: one after the other, each waited for a thread hop (240 us a file).
            for start in range(0, len(todo), PASS_CONCURRENCY):
                chunk = todo[start : start + PASS_CONCURRENCY]
                await asyncio.gather(*(take(entry, resource) for entry, resource in chunk))
        fresh = {key: observed for key, (epoch, observed) in taken.items() if self._epoch.get(key, 0) == epoch}
        self._drifted[kind] = {
            key for key, observed in fresh.items() if key in self._baseline and self._baseline[key] != observed.state
        }
        log.info("observe.pass", kind=kind, observed=len(taken), seconds=round(time.perf_counter() - began, 3),
                 written="later" if write_later else "now")  # fmt: skip
        if write_later:
            self._unwritten[kind] = (taken, fresh)
        else:
            await self._write_pass(taken, fresh, echo=True)

    async def _write_pass(
        self, taken: dict[ResourceKey, tuple[int, Observed]], fresh: dict[ResourceKey, Observed], *, echo: bool
    ) -> None:
        """Write what a pass saw and the cache does not hold, but not what a plan observed again since. `echo`: the
        watch's event of each write queues its key's reconcile; else the cache takes it in as no change."""
        # Written in transactions of many (one put after the other took 1.45 ms each: 100,000 resources, 145 s).
        batch: list[Put] = []
        size = 0
        for key, observed in fresh.items():
            if self._epoch.get(key, 0) != taken[key][0]:
                continue  # observed again (by a plan) while this pass was writing
            put = self._put(observed) if echo else self.record_put(observed)
            if put is None:
                continue
            weight = request_bytes([put])
            if batch and (len(batch) == PASS_BATCH or size + weight > MAX_REQUEST_BYTES // 2):  # sent before it would
                if not await self._write(batch):  # outgrow etcd's limits
                    return
                batch, size = [], 0
            batch.append(put)
            size += weight
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[Put]) -> bool:
        """Write a pass's observations in one transaction; False (logged) when etcd refused or did not answer."""
        try:
            await self._store.put_all([(put.key, put.value) for put in batch])
        except (StoreUnavailableError, StoreError) as e:
            log.warning("observe.write_failed", keys=len(batch), first=batch[0].key, error=str(e)[:300])
            return False  # etcd is down or refusing writes: the next pass tries again
        return True
