"""The change path: ingest, coalescing, latency and throughput.

`Changes` follows each desired change from its put to the status that
answers it: `Converged` at that very revision (its latency), or at a later
one of the same key (superseded: coalesced into a later change), or neither
yet (pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

from benchmarks.context import Context, put_files
from benchmarks.figures import Figures, percentile
from benchmarks.load import blast, paced
from benchmarks.rig import Rig, StatusWatch, file_resource, metric_sum
from plans import ResourceKey
from reconciler.cache import Cache
from reconciler.keys import Section
from reconciler.metrics import Metrics
from reconciler.store import range_end
from reconciler.watch import Reflector
from reconciler.workqueue import WorkQueue


class Changes:
    """Desired changes put, and what became of each (see the module docstring)."""

    def __init__(self, watch: StatusWatch) -> None:
        self._watch = watch
        watch.on_converged = self._converged
        self.pending: dict[str, list[tuple[int, float]]] = {}  # name -> [(revision, sent at)]
        self.latencies: list[float] = []
        self.superseded = 0

    def reset(self) -> None:
        """Forget what was counted (pending changes stay pending)."""
        self.latencies, self.superseded = [], 0

    def put(self, name: str, revision: int, sent: float) -> None:
        self.pending.setdefault(name, []).append((revision, sent))
        converged = self._watch.converged.get(name)
        if converged is not None and converged[0] >= revision:  # answered before the put's answer came back
            self._converged(name, *converged)

    def _converged(self, name: str, revision: int, at: float) -> None:
        waiting = self.pending.get(name)
        if not waiting:
            return
        left = []
        for rev, sent in waiting:
            if rev == revision:
                self.latencies.append(at - sent)
            elif rev < revision:
                self.superseded += 1
            else:
                left.append((rev, sent))
        if left:
            self.pending[name] = left
        else:
            del self.pending[name]

    @property
    def backlog(self) -> int:
        return sum(len(waiting) for waiting in self.pending.values())

    async def drain(self, timeout: float, rig: Rig) -> float | None:
        """Wait until nothing is pending, at most `timeout` s; the `time.perf_counter()` it happened, or None."""
        deadline = time.perf_counter() + timeout
        while self.pending:
            rig.alive()
            if time.perf_counter() > deadline:
                return None
            await asyncio.sleep(0.005)
        return time.perf_counter()

    def censored(self, now: float) -> list[float]:
        """For each change still pending, how long it has waited so far (a lower bound on its latency)."""
        return [now - sent for waiting in self.pending.values() for _, sent in waiting]


async def idle(rig: Rig, *, timeout: float = 10.0) -> bool:
    """Wait until the daemon's queue is empty and no reconcile is under way (True), at most `timeout` s."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        text = await rig.metrics()
        if (
            metric_sum(text, "setpoint_workqueue_depth") == 0
            and metric_sum(text, "setpoint_workqueue_longest_running_processor_seconds") == 0
        ):
            return True
        await asyncio.sleep(0.1)
    return False


async def start_converged(ctx: Context, rig: Rig, watch: StatusWatch, expected: dict[str, int], what: str) -> None:
    """Start the daemon on the resources of `expected` and wait until all are `Converged` and it is idle."""
    watch.start(1)
    await rig.start_daemon()
    await rig.wait_ready(120)
    ctx.say(what, f"the daemon (pid {rig.pid}) is ready; converging {len(expected):,} resources")
    done, _ = await watch.wait(expected, timeout=ctx.setup_cap(len(expected)))
    if not done:
        missing = watch.missing(expected)
        raise RuntimeError(f"setup: {missing:,} of {len(expected):,} resources not Converged after "
                           f"{ctx.setup_cap(len(expected)):g} s")  # fmt: skip
    await idle(rig)


# -- ingest ------------------------------------------------------------------------------------------------------


def etcdctl_binary(rig: Rig) -> str:
    beside = Path(rig.etcd.binary).with_name("etcdctl")
    found = str(beside) if beside.exists() else shutil.which("etcdctl")
    if found is None:
        raise RuntimeError("no etcdctl beside etcd or on PATH")
    return found


async def etcdctl_replay(rig: Rig, *, start_revision: int, last_key: str, timeout: float) -> float:
    """Seconds from starting `etcdctl watch --rev` on the reflector's range until it has printed `last_key`."""
    start = rig.keys.section(Section.ACTUAL)
    end = range_end(rig.keys.section(Section.ISSUES).encode()).decode()
    wanted = f"\n{last_key}\n".encode()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        etcdctl_binary(rig), f"--endpoints={rig.etcd.endpoint}", "watch", f"--rev={start_revision}", start, end,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        tail = b"\n"
        async with asyncio.timeout(timeout):
            while True:
                chunk = await proc.stdout.read(1 << 16)
                if not chunk:
                    raise RuntimeError("etcdctl watch ended before the last event")
                if wanted in tail + chunk:
                    return time.perf_counter() - started
                tail = chunk[-len(wanted) :]
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def reflector_replay(rig: Rig, *, after_revision: int, last: ResourceKey, timeout: float) -> tuple[float, int]:
    """Seconds from starting setpoint's reflector (watch -> cache -> work queue) at `after_revision` + 1 until
    the work queue has been given `last`; and how many keys the queue then holds."""
    cache = Cache(rig.keys)
    cache.revision = after_revision
    queue: WorkQueue[ResourceKey] = WorkQueue()
    got = asyncio.Event()

    def on_change(key: ResourceKey) -> None:
        queue.add(key)
        if key == last:
            got.set()

    reflector = Reflector(store=rig.db, keys=rig.keys, cache=cache, on_change=on_change, metrics=Metrics())
    reflector.synced.set()  # no list: replay history from the cache's revision
    started = time.perf_counter()
    task = asyncio.create_task(reflector.run())
    try:
        await asyncio.wait_for(got.wait(), timeout)
        return time.perf_counter() - started, len(queue)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await queue.shutdown()


async def ingest(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    async with ctx.rig("ingest") as rig:
        start_revision = await rig.revision()
        ctx.say("ingest", f"writing {s.ingest_events:,} events (one put each)")
        last = (0, "")

        def make(i: int) -> tuple[str, bytes]:
            return rig.desired_key(f"e{i:06d}"), file_resource(rig.files, f"e{i:06d}", f"event {i}\n")

        def on_put(i: int, key: str, revision: int, sent: float) -> None:
            nonlocal last
            last = max(last, (revision, key))

        written = await blast(rig.db, make, concurrency=s.concurrency, count=s.ingest_events, on_put=on_put)
        out.details["write_rate"] = written.rate
        last_key = ResourceKey(kind="file", name=last[1].rsplit("/", 1)[1])
        timeout = 30 + s.ingest_events / 1000
        etcdctl, setpoint = [], []
        queued = 0
        for _ in range(2):  # alternated, best of two each: the machine is shared
            etcdctl.append(await etcdctl_replay(rig, start_revision=start_revision + 1, last_key=last[1],
                                                timeout=timeout))  # fmt: skip
            took, queued = await reflector_replay(rig, after_revision=start_revision, last=last_key, timeout=timeout)
            setpoint.append(took)
        out.details.update(etcdctl_seconds=etcdctl, setpoint_seconds=setpoint, keys_queued=queued)
        etcdctl_rate = s.ingest_events / min(etcdctl)
        setpoint_rate = s.ingest_events / min(setpoint)
        out.add("events replayed", s.ingest_events)
        out.add("etcdctl watch --rev", etcdctl_rate, "events/s")
        out.add("setpoint watch->cache->queue", setpoint_rate, "events/s")
        out.check("ratio setpoint / etcdctl", setpoint_rate / etcdctl_rate, "", ">= 0.9", lambda v: v >= 0.9)
        if queued != s.ingest_events:
            raise RuntimeError(f"the queue holds {queued} keys, not {s.ingest_events}")


# -- coalescing --------------------------------------------------------------------------------------------------


async def coalescing(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    n = s.coalescing_keys
    target = round(n * 1.1)
    async with ctx.rig("coalescing") as rig, StatusWatch(rig) as watch:
        expected = await put_files(rig, "c", n)
        await start_converged(ctx, rig, watch, expected, "coalescing")
        before = await rig.metric("setpoint_reconcile_total")
        names = list(expected)
        last: dict[str, int] = {}

        def make(i: int) -> tuple[str, bytes]:
            name = names[i % n]
            return rig.desired_key(name), file_resource(rig.files, name, f"write {i}\n")

        def on_put(i: int, key: str, revision: int, sent: float) -> None:
            name = names[i % n]
            last[name] = max(last.get(name, 0), revision)

        ctx.say("coalescing", f"{s.coalescing_writes:,} writes over {n:,} keys, {s.concurrency} in flight")
        started = time.perf_counter()
        written = await blast(rig.db, make, concurrency=s.concurrency, count=s.coalescing_writes, on_put=on_put)
        done, at = await watch.wait(last, timeout=ctx.measure_cap(s.coalescing_writes // 10))
        settled = await idle(rig)
        reconciles = int(await rig.metric("setpoint_reconcile_total") - before)
        out.details.update(write_seconds=written.seconds, settled=settled, missing=watch.missing(last))
        out.add("writes", written.puts)
        out.add("etcd took writes at", written.rate, "writes/s")
        out.check("reconciles run", reconciles, "", f"<= {target:,}", lambda v: v <= target)
        out.check("all Converged at their last write", done, "", "yes", bool)
        out.add("first write to all Converged", (at - started) if done else None, "s")
        out.add("last write to all Converged", (at - started - written.seconds) if done else None, "s")


# -- latency and throughput --------------------------------------------------------------------------------------


async def load_window(
    rig: Rig, changes: Changes, names: list[str], *, rate: float, seconds: float, in_flight: int, offset: int,
    drain_cap: float,
) -> dict[str, float | int | bool | None]:  # fmt: skip
    """`rate` changes a second for `seconds`, key after key of `names`, each a new content; what became of them."""
    changes.reset()
    n = len(names)

    def make(i: int) -> tuple[str, bytes]:
        name = names[(offset + i) % n]
        return rig.desired_key(name), file_resource(rig.files, name, f"change {offset + i}\n")

    def on_put(i: int, key: str, revision: int, sent: float) -> None:
        changes.put(names[(offset + i) % n], revision, sent)

    load = await paced(rig.db, make, rate=rate, seconds=seconds, max_in_flight=in_flight, on_put=on_put)
    ended = time.perf_counter()
    backlog = changes.backlog
    drained = await changes.drain(drain_cap, rig)
    now = time.perf_counter()
    censored = changes.censored(now)
    lost: int | None = 0
    if censored:  # lost only if the daemon has nothing left to do; else they may still come
        lost = len(censored) if await idle(rig, timeout=1.0) else None
    every = changes.latencies + censored
    return {
        "puts": load.puts, "achieved_rate": load.puts / load.seconds, "late_max_s": load.late_max,
        "late_puts": load.late_puts, "converged": len(changes.latencies), "superseded": changes.superseded,
        "unfinished": len(censored), "lost": lost, "backlog_at_end": backlog,
        "drain_s": None if drained is None else drained - ended,
        "p50_s": percentile(every, 50), "p99_s": percentile(every, 99), "max_s": max(every, default=None),
    }  # fmt: skip


def _ms(value: float | int | bool | None) -> float | None:
    return None if value is None else float(value) * 1000


async def latency(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    async with ctx.rig("latency") as rig, StatusWatch(rig) as watch:
        expected = await put_files(rig, "l", s.latency_resources)
        await start_converged(ctx, rig, watch, expected, "latency")
        changes = Changes(watch)
        ctx.say("latency", f"{s.latency_rate:g} changes/s for {s.latency_seconds:g} s")
        result = await load_window(
            rig, changes, list(expected), rate=s.latency_rate, seconds=s.latency_seconds, in_flight=s.concurrency,
            offset=0, drain_cap=max(10.0, s.latency_seconds),
        )  # fmt: skip
        out.details.update(result)
        out.add("resources", s.latency_resources)
        out.add("changes put", result["puts"])
        out.add("load generator max lateness", _ms(result["late_max_s"]), "ms")
        out.add("p50 put -> Converged", _ms(result["p50_s"]), "ms")
        out.check("p99 put -> Converged", _ms(result["p99_s"]), "ms", "<= 50 ms", lambda v: v <= 50)
        out.add("max put -> Converged", _ms(result["max_s"]), "ms")
        out.add("superseded by a later change", result["superseded"])
        out.add("backlog when the load ended", result["backlog_at_end"], "changes")
        drain = result["drain_s"]
        out.check("kept up (all answered <= 1 s after the load)", drain is not None and float(drain) <= 1.0, "",
                  "yes", bool)  # fmt: skip
        lost = result["lost"]
        out.check("changes lost", lost if lost is not None else None, "", "0", lambda v: v == 0)
        if lost is None:
            out.add("unanswered, daemon still busy", result["unfinished"], "changes")


async def throughput(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    async with ctx.rig("throughput") as rig, StatusWatch(rig) as watch:
        expected = await put_files(rig, "t", s.throughput_resources)
        await start_converged(ctx, rig, watch, expected, "throughput")
        outside = rig.keys.section(Section.DESIRED).replace("/desired/", "/elsewhere/")
        value = file_resource(rig.files, "t000000", "change 0\n")
        etcd = await blast(rig.db, lambda i: (f"{outside}k{i % 1000}", value), concurrency=s.concurrency,
                           seconds=s.throughput_window)  # fmt: skip
        changes = Changes(watch)
        names = list(expected)
        tried: list[dict[str, float | int | bool | None]] = []
        offset = 0

        async def holds(rate: float) -> bool:
            nonlocal offset
            ctx.say("throughput", f"trying {rate:,.0f} changes/s for {s.throughput_window:g} s")
            result = await load_window(
                rig, changes, names, rate=rate, seconds=s.throughput_window, in_flight=s.concurrency, offset=offset,
                drain_cap=max(5.0, 2 * s.throughput_window),
            )  # fmt: skip
            offset += int(result["puts"] or 0)
            if changes.pending:  # a backlog left over must not count against the next rate
                await changes.drain(ctx.measure_cap(changes.backlog), rig)
            await idle(rig, timeout=30.0)
            p99 = result["p99_s"]
            ok = p99 is not None and float(p99) < 1.0 and not result["unfinished"]
            ok = ok and float(result["achieved_rate"] or 0) >= 0.95 * rate  # the generator kept its pace
            tried.append({"rate": rate, "sustained": ok, **result})
            return ok

        good, bad, rate = 0.0, None, s.throughput_start_rate
        while bad is None:
            if rate > etcd.rate:
                bad = rate
            elif await holds(rate):
                good, rate = rate, rate * 2
            else:
                bad = rate
        for _ in range(s.throughput_bisections):
            mid = (good + bad) / 2
            if await holds(mid):
                good = mid
            else:
                bad = mid
        out.details.update(etcd_put_rate=etcd.rate, tried=tried)
        out.add("etcd put rate (same generator)", etcd.rate, "puts/s")
        out.add("highest rate with p99 < 1 s", good or None, "changes/s")
        out.add("ratio to etcd's put rate", good / etcd.rate if good and etcd.rate else None)
        out.add("rates tried", len(tried))
