"""The load generator: puts to etcd from this process, as fast as they go or at a set pace.

Every put is one `EtcdStore.put` (one etcd revision each), the client the
daemon uses itself; `bulk` writes in transactions instead, for setting up
many keys quickly. `blast` keeps `concurrency` puts in flight until `count`
are done or `seconds` have passed: etcd's own put rate as this generator
sees it. `paced` is open-loop: put i is due at start + i / rate, whatever
happened to the ones before (at most `max_in_flight` at once; a put that
could not be sent on time is sent late, and how late is reported), so a
slow daemon cannot slow the load down.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reconciler.store import EtcdStore

# Called after each put with (index, key, revision, sent at `time.perf_counter()`).
OnPut = Callable[[int, str, int, float], None]
MakePut = Callable[[int], tuple[str, bytes]]


async def bulk(
    store: EtcdStore, items: Sequence[tuple[str, bytes]], *, batch: int = 100, concurrency: int = 8
) -> dict[str, int]:
    """Write `items` in transactions of `batch`; each key's revision."""
    revisions: dict[str, int] = {}
    chunks = iter(range(0, len(items), batch))

    async def writer() -> None:
        for start in chunks:
            part = items[start : start + batch]
            revision = await store.put_all(part)
            revisions.update((key, revision) for key, _ in part)

    await asyncio.gather(*(writer() for _ in range(concurrency)))
    return revisions


@dataclass(frozen=True)
class Blast:
    puts: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.puts / self.seconds if self.seconds > 0 else 0.0


async def blast(
    store: EtcdStore, make: MakePut, *, concurrency: int, count: int | None = None, seconds: float | None = None,
    on_put: OnPut | None = None,
) -> Blast:  # fmt: skip
    """Keep `concurrency` puts in flight until `count` are done or `seconds` have passed."""
    if count is None and seconds is None:
        raise ValueError("blast needs a count or a duration")
    indices = itertools.count() if count is None else iter(range(count))
    started = time.perf_counter()
    deadline = started + seconds if seconds is not None else None
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in indices:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            key, value = make(i)
            sent = time.perf_counter()
            revision = await store.put(key, value)
            done += 1
            if on_put is not None:
                on_put(i, key, revision, sent)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Blast(puts=done, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class Paced:
    puts: int
    seconds: float
    late_max: float  # the latest a put was sent after it was due, seconds
    late_puts: int  # puts sent more than 10 ms after they were due


async def paced(
    store: EtcdStore, make: MakePut, *, rate: float, seconds: float, max_in_flight: int = 256,
    on_put: OnPut | None = None,
) -> Paced:  # fmt: skip
    """Put `rate` times a second for `seconds`, each put due at start + i / rate (open loop)."""
    total = max(1, round(rate * seconds))
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    late_max, late_puts = 0.0, 0
    started = time.perf_counter()

    async def put(i: int, key: str, value: bytes, sent: float) -> None:
        try:
            revision = await store.put(key, value)
        finally:
            slots.release()
        if on_put is not None:
            on_put(i, key, revision, sent)

    for i in range(total):
        due = started + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await slots.acquire()
        key, value = make(i)
        sent = time.perf_counter()
        late = sent - due
        late_max = max(late_max, late)
        late_puts += late > 0.010
        task = asyncio.create_task(put(i, key, value, sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return Paced(puts=total, seconds=time.perf_counter() - started, late_max=late_max, late_puts=late_puts)
