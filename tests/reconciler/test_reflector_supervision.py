"""The reflector outlives whatever ends its watch, with a capped backoff on a fake clock.

The store is faked at our own wrapper's seam (`range` and `watch`), so each
test scripts exactly what every watch attempt does and reads back what the
reflector asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest
import structlog

from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.clock import FakeClock
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import WatchSettings
from reconciler.store import (
    EtcdStore,
    KeyValue,
    StoreError,
    StoreUnavailableError,
    WatchBatch,
    WatchCompactedError,
    WatchEvent,
    WatchStalledError,
)
from reconciler.watch import Reflector

KEYS = KeySpace("/sp")
LIST_REVISION = 10
SETTINGS = WatchSettings(backoff_base_seconds=1.0, backoff_max_seconds=8.0, progress_seconds=3.0, stall_seconds=9.0)

# One watch attempt: yields these batches, then raises this error (or waits forever when None).
Attempt = tuple[list[WatchBatch], BaseException | None]


def put(name: str, revision: int) -> WatchEvent:
    value = json.dumps({"kind": "file", "name": name, "spec": {"path": f"/r/{name}", "content": "x"}}).encode()
    kv = KeyValue(key=KEYS.desired(file(name)).encode(), value=value, mod_revision=revision)
    return WatchEvent(type="put", kv=kv)


def file(name: str) -> ResourceKey:
    return ResourceKey(kind="file", name=name)


@dataclass
class FakeStore:
    attempts: list[Attempt]
    range_errors: list[BaseException] = field(default_factory=list)
    lists: int = 0
    watched_from: list[int] = field(default_factory=list)
    watch_options: list[tuple[float | None, float | None]] = field(default_factory=list)
    closed: int = 0

    async def range(self, start: bytes, end: bytes, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        if self.range_errors:
            raise self.range_errors.pop(0)
        if revision == 0:  # the list itself; the status read that follows pins the list's revision
            self.lists += 1
        return [], revision or LIST_REVISION

    async def watch(
        self,
        start: bytes,
        end: bytes,
        *,
        start_revision: int,
        progress_after: float | None = None,
        stall_after: float | None = None,
    ) -> AsyncGenerator[WatchBatch, None]:
        self.watched_from.append(start_revision)
        self.watch_options.append((progress_after, stall_after))
        batches, error = self.attempts.pop(0) if self.attempts else ([], None)
        try:
            for batch in batches:
                yield batch
            if error is None:
                await asyncio.Event().wait()
            else:
                raise error
        finally:
            self.closed += 1


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(
    store: FakeStore, clock: FakeClock, seen: list[ResourceKey] | None = None
) -> AsyncIterator[tuple[Reflector, Cache, Metrics, asyncio.Task[None]]]:
    cache = Cache(KEYS)
    metrics = Metrics()
    on_change: Callable[[ResourceKey], None] = seen.append if seen is not None else (lambda key: None)
    reflector = Reflector(
        store=cast(EtcdStore, store), keys=KEYS, cache=cache, on_change=on_change, metrics=metrics,
        settings=SETTINGS, clock=clock,
    )  # fmt: skip
    task = asyncio.create_task(reflector.run())
    try:
        await settle()
        yield reflector, cache, metrics, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def restarts(metrics: Metrics, reason: str) -> float:
    return cast(float, metrics.watch_restarts.labels(reason=reason)._value.get())


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (StoreUnavailableError("etcd is unavailable: UNAVAILABLE"), "unavailable"),
        (StoreError("etcd refused the request: PERMISSION_DENIED"), "error"),
        (WatchStalledError(9.0), "stalled"),
        (RuntimeError("a bug below us"), "error"),
        (ValueError("a malformed response"), "error"),
    ],
)
async def test_any_failure_is_counted_by_reason_and_the_watch_resumes_after_the_last_revision(
    error: Exception, reason: str
) -> None:
    store = FakeStore(attempts=[([], error)])
    clock = FakeClock()
    async with running(store, clock) as (_, _, metrics, task):
        assert restarts(metrics, reason) == 1
        clock.advance(SETTINGS.backoff_base_seconds)
        await settle()

        assert not task.done(), "the reflector must survive the failure"
        assert store.watched_from == [LIST_REVISION + 1, LIST_REVISION + 1]
        assert store.lists == 1, "an outage is resumed from the cache, not relisted"


async def test_each_failure_is_logged_once() -> None:
    store = FakeStore(attempts=[([], WatchStalledError(9.0)), ([], RuntimeError("boom"))])
    clock = FakeClock()
    with structlog.testing.capture_logs() as logs:
        async with running(store, clock):
            clock.advance(SETTINGS.backoff_base_seconds)
            await settle()
    events = [line["event"] for line in logs if line["event"].startswith("watch.") and line["event"] != "watch.listed"]

    assert events == ["watch.stalled", "watch.failed"]
    failed = next(line for line in logs if line["event"] == "watch.failed")
    assert failed["error_type"] == "RuntimeError" and failed["log_level"] == "error"
    assert isinstance(failed["exc_info"], RuntimeError), "an unexpected failure is logged with its traceback"


async def test_cancellation_ends_the_reflector_and_closes_the_stream() -> None:
    store = FakeStore(attempts=[])
    clock = FakeClock()
    async with running(store, clock) as (_, _, _, task):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert store.closed == 1


async def test_backoff_doubles_to_its_cap_with_jitter_and_starts_over_once_a_stream_delivers() -> None:
    outage = StoreUnavailableError("down")
    store = FakeStore(attempts=[([], outage)] * 6 + [([WatchBatch(events=(), revision=40)], outage)])
    clock = FakeClock()
    async with running(store, clock) as (_, _, metrics, _):
        waits: list[float] = []
        for _ in range(7):
            attempts = len(store.watched_from)
            # Step the fake clock until the reflector opens its next watch: that is the delay it chose.
            waited = 0.0
            while len(store.watched_from) == attempts:
                assert waited < 100, "the reflector stopped watching"
                clock.advance(0.25)
                waited += 0.25
                await settle()
            waits.append(waited)

    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for waited, ceiling in zip(waits, ceilings, strict=False):
        assert ceiling / 2 <= waited <= ceiling + 0.25, (waits, ceilings)
    assert waits[6] <= SETTINGS.backoff_base_seconds + 0.25, f"a working stream resets the backoff: {waits}"
    assert restarts(metrics, "unavailable") == 7


async def test_a_progress_notification_moves_the_resume_revision_and_a_progress_answer_does_not() -> None:
    store = FakeStore(
        attempts=[
            ([WatchBatch(events=(put("a", 12),), revision=15)], StoreUnavailableError("down")),
            ([WatchBatch(events=(), revision=30, progress=False)], StoreUnavailableError("down")),
            ([WatchBatch(events=(), revision=31, progress=True)], StoreUnavailableError("down")),
        ]
    )
    clock = FakeClock()
    seen: list[ResourceKey] = []
    async with running(store, clock, seen) as (_, cache, metrics, _):
        for _ in range(3):
            clock.advance(SETTINGS.backoff_max_seconds)
            await settle()

        # The header revision of an event batch, and the answer to a progress
        # request, may run ahead of events still to come; only the watcher's own
        # progress notification says nothing before it is pending.
        assert store.watched_from == [11, 13, 13, 32]
        assert cache.revision == 31
        assert metrics.etcd_revision._value.get() == 31
        assert file("a") in seen


async def test_every_watch_response_events_or_progress_stamps_the_last_response_time() -> None:
    store = FakeStore(
        attempts=[
            ([WatchBatch(events=(put("a", 12),), revision=15)], StoreUnavailableError("down")),
            ([WatchBatch(events=(), revision=30, progress=True)], None),
        ]
    )
    clock = FakeClock()
    before = time.time()
    async with running(store, clock) as (_, _, metrics, _):
        stamped = metrics.registry.get_sample_value("setpoint_watch_last_response_timestamp_seconds")
        assert before <= stamped <= time.time(), "the batch of events stamps it"
        await asyncio.sleep(0.01)  # so that a later stamp is a larger one
        clock.advance(SETTINGS.backoff_max_seconds)  # the second watch opens after its backoff
        await settle()
        assert store.watched_from == [11, 13]
        later = metrics.registry.get_sample_value("setpoint_watch_last_response_timestamp_seconds")
        assert stamped < later <= time.time(), "the progress notification stamps it again"


async def test_the_list_is_no_watch_response() -> None:
    async with running(FakeStore(attempts=[]), FakeClock()) as (reflector, _, metrics, _):
        assert reflector.synced.is_set()
        assert metrics.registry.get_sample_value("setpoint_watch_last_response_timestamp_seconds") == 0


async def test_the_watch_gets_the_progress_and_stall_settings() -> None:
    store = FakeStore(attempts=[])
    async with running(store, FakeClock()):
        assert store.watch_options == [(SETTINGS.progress_seconds, SETTINGS.stall_seconds)]


async def test_compaction_relists_at_once_and_a_failed_relist_is_retried() -> None:
    store = FakeStore(attempts=[([], WatchCompactedError(20))])
    clock = FakeClock()
    async with running(store, clock) as (reflector, _, metrics, task):
        assert restarts(metrics, "compacted") == 1
        assert store.lists == 2, "compaction relists without waiting"
        assert reflector.synced.is_set()

    store = FakeStore(attempts=[], range_errors=[StoreUnavailableError("down"), RuntimeError("odd")])
    async with running(store, clock) as (reflector, _, metrics, task):
        assert not reflector.synced.is_set()
        clock.advance(SETTINGS.backoff_max_seconds)
        await settle()
        clock.advance(SETTINGS.backoff_max_seconds)
        await settle()
        assert reflector.synced.is_set() and not task.done()
        assert restarts(metrics, "unavailable") == 1 and restarts(metrics, "error") == 1
