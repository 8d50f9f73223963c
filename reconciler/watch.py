"""List-then-watch: turns etcd into cache updates and queue keys, and nothing else.

The reflector lists `actual/` .. `issues/` (one contiguous key range, which
also holds `approvals/` and `desired/`) at a revision R, then watches from
R+1. A compacted start revision means events were lost, so it
relists at a fresh revision and synthesises deletes for keys that vanished,
never resuming silently.

Anything else that ends the watch (etcd down, a refusal, a stream that went
silent, a bug) is logged once, counted in `setpoint_etcd_watch_restarts_total`
by reason, and followed by a capped, jittered exponential backoff before the
watch is opened again from the last revision the cache holds. The backoff
starts over once a stream delivers something. Only cancellation ends `run`:
the daemon treats a reflector that returns as a crashed component.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

import structlog

from plans import ResourceKey
from reconciler.cache import Cache, Change
from reconciler.clock import Clock, SystemClock
from reconciler.heap import building
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.settings import WatchSettings
from reconciler.store import (
    EtcdStore,
    KeyValue,
    StoreError,
    StoreUnavailableError,
    WatchCompactedError,
    WatchStalledError,
    range_end,
)

log = structlog.get_logger("setpoint.watch")


async def list_all(store: EtcdStore, keys: KeySpace) -> tuple[list[KeyValue], list[KeyValue], int]:
    """What the cache is built from, at one revision: `actual/` .. `issues/` (approvals and desired between),
    the statuses, and that revision."""
    start = keys.section(Section.ACTUAL).encode()
    kvs, revision = await store.range(start, range_end(keys.section(Section.ISSUES).encode()))
    status_start = keys.section(Section.STATUS).encode()
    statuses, _ = await store.range(status_start, range_end(status_start), revision=revision)
    return kvs, statuses, revision


class Reflector:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        on_change: Callable[[ResourceKey], None],
        metrics: Metrics,
        on_approval: Callable[[str], None] = lambda plan_id: None,
        settings: WatchSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`settings` defaults to `WatchSettings()`; `clock` (for the backoff) to the system clock."""
        self._store = store
        self._keys = keys
        self._cache = cache
        self._on_change = on_change
        self._on_approval = on_approval
        self._metrics = metrics
        self._settings = settings or WatchSettings()
        self._clock: Clock = clock or SystemClock()
        self._start = keys.section(Section.ACTUAL).encode()
        self._end = range_end(keys.section(Section.ISSUES).encode())
        self._failures = 0
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """List (unless an earlier run already did), then watch; returns only by cancellation."""
        need_list = not self.synced.is_set()
        self._failures = 0
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                await self._watch()
            except WatchCompactedError as e:
                # etcd answered, so no backoff: the relist is the way forward.
                log.warning("watch.compacted", compact_revision=e.compact_revision, revision=self._cache.revision)
                self._metrics.watch_restarts.labels(reason="compacted").inc()
                need_list = True
            except Exception as e:  # the watch's boundary: whatever ended it, open it again
                await self._back_off(e)

    async def _back_off(self, error: Exception) -> None:
        """Log and count one failure, then wait out its backoff."""
        self._failures += 1
        delay = self._delay(self._failures)
        fields = {"revision": self._cache.revision, "retry_in": round(delay, 3), "error": str(error)[:500]}
        if isinstance(error, WatchStalledError):
            reason = "stalled"
            log.warning("watch.stalled", **fields)
        elif isinstance(error, StoreUnavailableError):
            reason = "unavailable"
            log.warning("watch.disconnected", reason=reason, **fields)
        elif isinstance(error, StoreError):
            # A refusal (not just an outage) is retried too: the watch must outlive
            # anything etcd says, and the log line makes a persistent refusal visible.
            reason = "error"
            log.warning("watch.disconnected", reason=reason, **fields)
        else:
            reason = "error"
            log.error("watch.failed", error_type=type(error).__name__, exc_info=error, **fields)
        self._metrics.watch_restarts.labels(reason=reason).inc()
        await self._clock.sleep(delay)

    def _delay(self, failures: int) -> float:
        s = self._settings
        ceiling = min(s.backoff_max_seconds, s.backoff_base_seconds * 2 ** min(failures - 1, 32))
        return random.uniform(ceiling / 2, ceiling)

    async def _relist(self) -> None:
        with building():  # hundreds of thousands of objects that live as long as the daemon
            await self._list()

    async def _list(self) -> None:
        kvs, statuses, revision = await list_all(self._store, self._keys)
        # No await from here on: the cache moves to `revision` and every change is
        # emitted in one step, so nobody sees the new state before its keys are queued.
        changes, orphans = self._cache.relist(kvs, statuses, revision)
        self._metrics.etcd_revision.set(revision)
        log.info("watch.listed", keys=len(kvs), revision=revision, changes=len(changes))
        for change in changes:
            self._emit(change)
        # Level-triggered: after a (re)list every key is looked at again, and so
        # is every status left without a desired value (to be torn down or cleared).
        for key in [*self._cache.resource_keys(), *orphans]:
            self._on_change(key)
        self.synced.set()

    async def _watch(self) -> None:
        s = self._settings
        stream = self._store.watch(
            self._start,
            self._end,
            start_revision=self._cache.revision + 1,
            progress_after=s.progress_seconds,
            stall_after=s.stall_seconds,
        )
        async with contextlib.aclosing(stream):
            async for batch in stream:
                self._failures = 0  # the stream works: the next failure starts the backoff over
                self._metrics.watch_last_response.set(time.time())  # wall-clock time, for alerting on its age
                last = self._cache.revision
                counts: dict[tuple[str, str], int] = {}  # the metric is updated once per response, not per event
                for event in batch.events:
                    label = (self._section_label(event.kv.key), event.type)
                    counts[label] = counts.get(label, 0) + 1
                    if event.type == "put":
                        change = self._cache.apply_put(event.kv)
                    else:
                        change = self._cache.apply_delete(event.kv.key, event.kv.mod_revision)
                    if change is not None:
                        self._emit(change)
                    if event.kv.mod_revision > last:
                        last = event.kv.mod_revision
                for (section, kind), count in counts.items():
                    self._metrics.events.labels(section=section, type=kind).inc(count)
                # A batch's header revision may run ahead of events still to come;
                # only a progress notification vouches for it (see EtcdStore.watch).
                if batch.progress:
                    last = max(last, batch.revision)
                self._cache.revision = last
                self._metrics.etcd_revision.set(last)

    def _emit(self, change: Change) -> None:
        if change.invalid_issue:  # ignored, never fatal; the resource is looked at, as its issues changed
            self._metrics.invalid_issues.inc()
            log.warning("issue.invalid", key=change.rejected_key, reason=change.reason)
        if change.resource is not None:
            self._on_change(change.resource)
        elif change.plan_id is not None:
            self._on_approval(change.plan_id)
        else:
            self._metrics.invalid_keys.inc()
            log.warning("key.rejected", key=change.rejected_key, reason=change.reason)

    def _section_label(self, key: bytes) -> str:
        text = key[len(self._start) - len("actual/") :].split(b"/", 1)[0]
        known = (b"actual", b"desired", b"approvals", b"issues")
        return text.decode("utf-8", "replace") if text in known else "other"
