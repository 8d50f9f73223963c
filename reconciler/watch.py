"""List-then-watch: turns etcd into cache updates and queue keys, and nothing else.

The reflector lists `actual/` .. `desired/` (one contiguous key range, which
also holds `approvals/`, ignored for now) at a revision R, then watches from
R+1 with `prev_kv`. A compacted start revision means events were lost, so it
relists at a fresh revision and synthesises deletes for keys that vanished,
never resuming silently. Transport errors reconnect with capped, jittered
exponential backoff and resume from the last revision seen.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import structlog

from plans import Resource, ResourceKey
from reconciler.cache import Cache, Change
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.status import applied_from_status
from reconciler.store import EtcdStore, StoreError, StoreUnavailableError, WatchCompactedError, range_end

log = structlog.get_logger("setpoint.watch")


class Reflector:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        on_change: Callable[[ResourceKey], None],
        metrics: Metrics,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self._store = store
        self._keys = keys
        self._cache = cache
        self._on_change = on_change
        self._metrics = metrics
        self._start = keys.section(Section.ACTUAL).encode()
        self._end = range_end(keys.section(Section.DESIRED).encode())
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """List (unless an earlier run already did), then watch until cancelled."""
        need_list = not self.synced.is_set()
        failures = 0
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                await self._watch()
            except WatchCompactedError as e:
                log.warning("watch.compacted", compact_revision=e.compact_revision, revision=self._cache.revision)
                self._metrics.watch_restarts.labels(reason="compacted").inc()
                need_list = True
                failures = 0
            except (StoreUnavailableError, StoreError) as e:
                # A refusal (not just an outage) is retried too: the watch must outlive
                # anything etcd says, and the log line makes a persistent refusal visible.
                failures += 1
                delay = self._delay(failures)
                reason = "unavailable" if isinstance(e, StoreUnavailableError) else "error"
                log.warning("watch.disconnected", reason=reason, error=str(e)[:500], retry_in=round(delay, 3))
                self._metrics.watch_restarts.labels(reason=reason).inc()
                await asyncio.sleep(delay)
            else:
                failures = 0

    def _delay(self, failures: int) -> float:
        ceiling = min(self._backoff_cap, self._backoff_base * 2 ** min(failures - 1, 32))
        return random.uniform(ceiling / 2, ceiling)

    async def _relist(self) -> None:
        kvs, revision = await self._store.range(self._start, self._end)
        changes = self._cache.replace(kvs, revision)
        orphans = await self._statuses_without_desired(revision)
        changes += self._cache.restore_tombstones(
            {key: applied for key, applied in orphans.items() if applied is not None}, revision
        )
        self._metrics.etcd_revision.set(revision)
        log.info("watch.listed", keys=len(kvs), revision=revision, changes=len(changes))
        for change in changes:
            self._emit(change)
        # Level-triggered: after a (re)list every key is looked at again, and so
        # is every status left without a desired value (to be torn down or cleared).
        for key in [*self._cache.resource_keys(), *orphans]:
            self._on_change(key)
        self.synced.set()

    async def _statuses_without_desired(self, revision: int) -> dict[ResourceKey, Resource | None]:
        """Statuses at `revision` whose desired key is absent, with the resource each last applied."""
        start = self._keys.section(Section.STATUS).encode()
        kvs, _ = await self._store.range(start, range_end(start), revision=revision)
        orphans: dict[ResourceKey, Resource | None] = {}
        for kv in kvs:
            parsed = self._keys.parse(kv.key)
            if parsed is None or parsed.resource is None:
                continue
            entry = self._cache.desired.get(parsed.resource)
            if entry is None or entry.deleted:
                orphans[parsed.resource] = applied_from_status(kv.value)
        return orphans

    async def _watch(self) -> None:
        async for batch in self._store.watch(self._start, self._end, start_revision=self._cache.revision + 1):
            last = self._cache.revision
            for event in batch.events:
                section = self._section_label(event.kv.key)
                self._metrics.events.labels(section=section, type=event.type).inc()
                if event.type == "put":
                    change = self._cache.apply_put(event.kv)
                else:
                    change = self._cache.apply_delete(event.kv.key, event.kv.mod_revision)
                if change is not None:
                    self._emit(change)
                last = max(last, event.kv.mod_revision)
            if not batch.events:
                last = max(last, batch.revision)  # a progress notification: nothing older is pending
            self._cache.revision = last
            self._metrics.etcd_revision.set(last)

    def _emit(self, change: Change) -> None:
        if change.resource is not None:
            self._on_change(change.resource)
        else:
            self._metrics.invalid_keys.inc()
            log.warning("key.rejected", key=change.rejected_key, reason=change.reason)

    def _section_label(self, key: bytes) -> str:
        text = key[len(self._start) - len("actual/"):].split(b"/", 1)[0]
        return text.decode("utf-8", "replace") if text in (b"actual", b"desired", b"approvals") else "other"
