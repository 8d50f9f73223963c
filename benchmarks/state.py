"""Holding state: resync, cold start, memory, and a flapping key planned by a language model."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.changes import idle, start_converged
from benchmarks.context import Context, put_files
from benchmarks.fakellm import MODEL, FakeModel
from benchmarks.figures import Figures
from benchmarks.rig import DaemonOptions, StatusWatch
from plans import ResourceKey

MB = 1024 * 1024


def _resync_logged(path: Path, offset: int) -> tuple[int, float | None]:
    """Read the daemon's log from `offset`: (the offset after its last whole line, the wall-clock time of the
    first `resync.began` line, if any)."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if b'"resync.began"' in line:
            record = json.loads(line)
            if record.get("event") == "resync.began":
                stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
                return offset + end, stamp.timestamp()
    return offset + end, None


async def resync(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    n = s.resync_resources
    # The file observer's own poll is put out of the way (an hour), so the pass measured is the resync alone.
    options = DaemonOptions(resync_seconds=s.resync_seconds, file_poll_seconds=3600)
    async with ctx.rig("resync", options) as rig, StatusWatch(rig) as watch:
        expected = await put_files(rig, "r", n)
        await start_converged(ctx, rig, watch, expected, "resync")
        out.details["idle_before"] = await idle(rig, timeout=ctx.measure_cap(n))  # a pass during setup ends
        revision_before = await rig.revision()
        offset = rig.log_path.stat().st_size
        ctx.say("resync", f"waiting for the next pass (reconciler.resync_seconds {s.resync_seconds:g})")
        # (wall clock, daemon CPU, reconciles) every 0.1 s until the pass's log line is seen; its baseline is the
        # last sample taken before that line's timestamp.
        samples: list[tuple[float, float, float]] = []
        deadline = time.perf_counter() + s.resync_seconds * 1.2 + 10
        began: float | None = None
        while began is None:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no resync pass began within {s.resync_seconds * 1.2 + 10:g} s")
            samples.append((time.time(), rig.cpu(), await rig.metric("setpoint_reconcile_total")))
            await asyncio.sleep(0.1)
            offset, began = _resync_logged(rig.log_path, offset)
        _, cpu_before, before = max((x for x in samples if x[0] <= began), default=samples[0])
        ended: float | None = None
        reconciles = 0.0
        pass_deadline = time.perf_counter() + ctx.measure_cap(n)
        while time.perf_counter() < pass_deadline:
            reconciles = await rig.metric("setpoint_reconcile_total") - before
            if reconciles >= n:
                ended = time.time()
                break
            await asyncio.sleep(0.1)
        cpu = rig.cpu() - cpu_before
        await idle(rig, timeout=ctx.measure_cap(n))
        written = await rig.revision() - revision_before
        out.details.update(reconciles=reconciles, cpu_seconds=cpu)
        out.add("resources", n)
        seconds = ended - began if ended is not None else None
        out.check("full resync pass", seconds, "s", "<= 2 s", lambda v: v <= 2.0)
        out.add("daemon CPU for the pass", cpu if ended is not None else None, "s")
        out.check("etcd revisions written by the pass", written, "", "0", lambda v: v == 0)


async def cold_start(ctx: Context, out: Figures) -> None:
    n = ctx.sizes.cold_start_keys
    async with ctx.rig("cold_start") as rig, StatusWatch(rig) as watch:
        ctx.say("cold_start", f"putting {n:,} desired keys before the daemon starts")
        expected = await put_files(rig, "k", n)
        out.add("desired keys", n)
        watch.start(await rig.revision() + 1)
        spawned = await rig.start_daemon()
        cap = 60 + n / 250
        try:
            ready = await rig.wait_ready(cap)
        except TimeoutError:
            out.check("to /readyz 200", None, "s", "<= 10 s", lambda v: v <= 10.0)
            out.add("not ready when the wait ended", cap, "s")
            return
        out.check("to /readyz 200", ready - spawned, "s", "<= 10 s", lambda v: v <= 10.0)
        ctx.say("cold_start", f"the daemon (pid {rig.pid}) was ready after {ready - spawned:.2f} s; converging")
        done, at = await watch.wait(expected, timeout=ctx.measure_cap(n))
        out.details.update(rss_mb=rig.rss() / MB, missing=watch.missing(expected))
        out.add("to all Converged", at - spawned if done else None, "s")
        out.add("Converged when measured", n - watch.missing(expected))


async def memory(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    async with ctx.rig("memory") as rig, StatusWatch(rig) as watch:
        expected = await put_files(rig, "m", s.memory_small)
        await start_converged(ctx, rig, watch, expected, "memory")
        await asyncio.sleep(2.0)
        out.add(f"RSS with {s.memory_small:,} resources, all converged", rig.rss() / MB, "MB")
        ctx.say("memory", f"adding {s.memory_large - s.memory_small:,} resources")
        expected.update(await put_files(rig, "m", s.memory_large - s.memory_small, start=s.memory_small))
        done, _ = await watch.wait(expected, timeout=ctx.measure_cap(s.memory_large))
        await idle(rig)
        await asyncio.sleep(2.0)
        converged = s.memory_large - watch.missing(expected)
        out.check(f"RSS with {s.memory_large:,} resources", rig.rss() / MB, "MB", "<= 150 MB, all converged",
                  lambda v: done and v <= 150)  # fmt: skip
        out.add("of which converged when measured", converged)


def _actual(name: str, state: dict[str, str]) -> bytes:
    value = {"kind": "service", "name": name, "state": state, "observed_at": datetime.now(UTC).isoformat()}
    return json.dumps(value).encode()


async def llm_flapping(ctx: Context, out: Figures) -> None:
    s = ctx.sizes
    base = ctx.base / "llm_flapping"
    config = base / "files" / "flappy.conf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("version 1\n")
    plan = {
        "reasoning": "the service runs another version than desired; look at its configuration",
        "steps": [{"tool": "file.read", "parameters": {"path": str(config)}, "description": "read the config",
                   "risk": "read_only"}],
    }  # fmt: skip
    async with FakeModel(plan) as model:
        tier = {"provider": "openai", "model": MODEL, "base_url": model.base_url, "api_key_env": "SETPOINT_BENCH_KEY",
                "timeout_seconds": 10}  # fmt: skip
        llm = {"tiers": {"small": [tier]}, "kinds": {"service": {"tools": ["file.read"]}}}
        options = DaemonOptions(extra={"llm": llm}, env={"SETPOINT_BENCH_KEY": "sk-bench-not-a-secret"})
        async with ctx.rig("llm_flapping", options) as rig, StatusWatch(rig, kind="service") as watch:
            key = ResourceKey(kind="service", name="flappy")
            spec = {"config": str(config), "version": "1"}
            desired = {"kind": "service", "name": "flappy", "spec": spec}
            await rig.db.put(rig.keys.actual(key), _actual("flappy", spec))
            revision = await rig.db.put(rig.keys.desired(key), json.dumps(desired).encode())
            await start_converged(ctx, rig, watch, {"flappy": revision}, "llm_flapping")
            ctx.say("llm_flapping", f"flapping the actual state every {s.llm_flap_seconds:g} s for {s.llm_seconds:g} s")
            flaps = round(s.llm_seconds / s.llm_flap_seconds)
            started = time.perf_counter()
            for i in range(flaps):
                state = {"config": str(config), "version": "2" if i % 2 == 0 else "1"}
                await rig.db.put(rig.keys.actual(key), _actual("flappy", state))
                await asyncio.sleep(max(0.0, started + (i + 1) * s.llm_flap_seconds - time.perf_counter()))
            await idle(rig)
            await asyncio.sleep(1.0)
            text_calls = await rig.metric("setpoint_llm_requests_total")
            hits = await rig.metric("setpoint_llm_plan_cache_hits_total")
            out.details.update(flaps=flaps, reconciles=await rig.metric("setpoint_reconcile_total"))
            out.add("actual-state flaps", flaps)
            out.check("model calls (fake server)", model.calls, "", "1", lambda v: v == 1)
            out.add("setpoint_llm_requests_total", int(text_calls))
            out.add("plans from the plan cache", int(hits))
