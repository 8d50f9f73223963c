"""The prober: probes the resources of probing agents (`http_check`) on their own schedule and reports failures.

It follows the cache: one task per valid, live check, started, restarted or
stopped as desired values appear, change or go away. It re-syncs on every
change notification for a probing kind and on a periodic sweep, so a missed
notification costs a delay, never a check. A check whose value changed keeps
what it counted if its target is the same.

Each task probes every `interval_seconds` (absolute deadlines: a slow probe
does not push the schedule back) and counts consecutive failures. It writes
`actual/<kind>/<name>` only when the outcome changed (passing, the last
status or error, failures counted up to the threshold, the target being
desired or not), never once per probe; latency goes to
`setpoint_probe_duration_seconds` instead. After `failure_threshold`
failures in a row it reports `issues/<target>/<kind>.<name>` (source
`<kind>/<name>`, severity warning, with when the failures began in
`details.reported_at`) and deletes it when the check passes again.

A report is healed once (`reconciler/issues.py`): when the target's status
says the report was dealt with (healed, failed, unhealable) and the check
still fails, it counts again, and after `failure_threshold` more failures it
writes a new report, which is healed afresh. Each further renewal in the
same run of failures waits twice as many probes (up to 32 times), so a check
whose target nothing can heal does not cost an issue, a status and a planner
call every few probes; the flap guard bounds the plans. A target with no
desired value gets no issue; the check's `actual/` says so
(`target_desired: false`). An issue of a check that is gone, invalid, or now
aims at another target is withdrawn, and the observation of a deleted check
is removed, both found by the sweep (also after a restart).

Probe writes are issued as writes of their own: etcd being unavailable costs
that write only, and the next probe tries again. Nothing a probed endpoint
does, and no value in etcd, ends a task: a probe that raises, or takes far
longer than its timeout, counts as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import structlog
from pydantic import JsonValue

from agents import AgentRegistry, ProbeResult, ProbeSchedule, ProbingAgent
from plans import NAME_PATTERN, InvalidResourceError, Issue, Observed, Resource, ResourceKey
from reconciler.cache import Cache, IssueEntry
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.status import StatusWriter
from reconciler.store import Delete, EtcdStore, Guard, Put

log = structlog.get_logger("setpoint.probes")

PROBE_SLACK_SECONDS = 5.0  # beyond a probe's own timeout, before the prober gives up on it
MAX_RENEWAL_FACTOR = 32
_MAX_ID_CHARS = 63


def issue_id(check: ResourceKey) -> str:
    """The id of the issue `check` reports on its target: `<kind>.<name>`, shortened with a hash when that would
    be longer than an issue id may be."""
    full = f"{check.kind}.{check.name}"
    if NAME_PATTERN.fullmatch(full) is not None:
        return full
    digest = hashlib.sha256(str(check).encode()).hexdigest()[:8]
    return f"{check.kind}.{check.name[: _MAX_ID_CHARS - len(check.kind) - 10]}-{digest}"


_Wanted = dict[ResourceKey, tuple[ProbingAgent, Resource, ProbeSchedule]]  # the live checks, as the cache says


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


@dataclass(slots=True)
class _Run:
    """What a check has seen since it last passed."""

    failures: int = 0
    failing_since: datetime | None = None
    counted: int = 0  # failures counted towards the next report
    counted_since: datetime | None = None
    renewals: int = 0  # reports dealt with while the check kept failing
    dealt_with: str | None = None  # the last report seen dealt with (IssueEntry.report)
    maybe_reported: bool = False  # an issue of ours may stand: withdraw it once the check passes


@dataclass(slots=True)
class _Check:
    key: ResourceKey
    agent: ProbingAgent
    resource: Resource
    schedule: ProbeSchedule
    run: _Run = field(default_factory=_Run)
    written: dict[str, JsonValue] | None = None  # the state this check last wrote to actual/
    task: asyncio.Task[None] | None = None

    @property
    def source(self) -> str:
        return str(self.key)

    @property
    def issue_id(self) -> str:
        return issue_id(self.key)


class Prober:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        cache: Cache,
        agents: AgentRegistry,
        status: StatusWriter,
        metrics: Metrics | None = None,
        sweep_seconds: float = 30.0,
    ) -> None:
        """`status` says what was done about the issues (the daemon's own status writer); `sweep_seconds` is how
        often the checks are re-synced without a notification (defaults to 30 s)."""
        self._store = store
        self._keys = keys
        self._cache = cache
        self._agents = agents
        self._status = status
        self._metrics = metrics
        self._sweep = sweep_seconds
        self._checks: dict[ResourceKey, _Check] = {}
        self._probing: dict[str, ProbingAgent | None] = {}
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def probing_agent(self, kind: str) -> ProbingAgent | None:
        if kind not in self._probing:  # the registry is fixed once assembled; a protocol check is not cheap
            agent = self._agents.for_kind(kind)
            self._probing[kind] = agent if isinstance(agent, ProbingAgent) else None
        return self._probing[kind]

    def notify(self, key: ResourceKey) -> None:
        """Something about `key` changed in the cache (what the watch calls for every key)."""
        if self.probing_agent(key.kind) is not None:
            self._wake.set()

    async def run(self) -> None:
        """Probe until cancelled; the session and every check's task end with it."""
        # A new connection per probe; no cap on how many at once, since a cap would make probes queue for a
        # connection and time out for that, not for their endpoint.
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": "setpoint-probe"}
        ) as session:
            self._session = session
            try:
                while True:
                    self._wake.clear()
                    try:
                        await self.sync()
                    except Exception as e:  # the sweep's boundary: the next one tries again
                        log.error("probe.sync_failed", error_type=type(e).__name__, error=str(e)[:300])
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._sweep):
                            await self._wake.wait()
            finally:
                checks = list(self._checks.values())
                self._checks.clear()
                await asyncio.gather(*(self._stop(check) for check in checks), return_exceptions=True)
                self._session = None

    async def sync(self) -> None:
        """Start, restart and stop checks to match the cache; withdraw what gone checks left behind."""
        wanted = self._wanted()
        for key, check in list(self._checks.items()):
            want = wanted.get(key)
            if want is not None and want[1] == check.resource:
                continue
            await self._stop(check)
            if want is None:
                del self._checks[key]
                log.info("probe.stopped", check=str(key))
                continue
            agent, resource, schedule = want
            if schedule.target != check.schedule.target:
                check.run = _Run()  # the issue on the old target is withdrawn below
            check.agent, check.resource, check.schedule = agent, resource, schedule
            self._start(check)
        for key, (agent, resource, schedule) in wanted.items():
            if key not in self._checks:
                self._checks[key] = check = _Check(key=key, agent=agent, resource=resource, schedule=schedule)
                self._start(check)
        await self._withdraw_strays(wanted)
        await self._forget_observations()

    def _wanted(self) -> _Wanted:
        wanted: _Wanted = {}
        for entry in list(self._cache.desired.values()):
            agent = self.probing_agent(entry.key.kind)
            if agent is None or entry.resource is None or not entry.valid or entry.deleted:
                continue
            check = self._checks.get(entry.key)
            if check is not None and check.resource == entry.resource:  # unchanged: its schedule stands
                wanted[entry.key] = (check.agent, check.resource, check.schedule)
                continue
            try:
                schedule = agent.schedule(entry.resource)
            except InvalidResourceError:
                continue  # its reconcile says so, as phase Invalid
            except Exception as e:  # an agent's bug costs this check only
                log.warning("probe.schedule_failed", check=str(entry.key), error_type=type(e).__name__,
                            error=str(e)[:300])  # fmt: skip
                continue
            wanted[entry.key] = (agent, entry.resource, schedule)
        return wanted

    def _start(self, check: _Check) -> None:
        check.task = asyncio.create_task(self._loop(check), name=f"probe {check.key}")
        log.info("probe.started", check=str(check.key), what=check.schedule.what, target=str(check.schedule.target))

    @staticmethod
    async def _stop(check: _Check) -> None:
        if check.task is not None:
            check.task.cancel()
            await asyncio.gather(check.task, return_exceptions=True)
            check.task = None

    async def _withdraw_strays(self, wanted: _Wanted) -> None:
        """Delete the issues checks reported that no live check stands behind where they are."""
        for target, entries in list(self._cache.issues.items()):
            for entry in list(entries.values()):
                check = self._reporter(entry)
                if check is None:
                    continue
                want = wanted.get(check)
                if want is not None and want[2].target == target:
                    continue
                path = self._keys.issue(target, entry.id)
                if await self._store.txn(guard=Guard(path, entry.mod_revision), then=[Delete(path)]):
                    log.info("probe.issue_withdrawn", check=str(check), target=str(target), reason="check is gone")

    def _reporter(self, entry: IssueEntry) -> ResourceKey | None:
        """The check that reported `entry`, when a check did (its source and id say so)."""
        try:
            check = ResourceKey.parse(entry.issue.source)
        except ValueError:
            return None
        if self.probing_agent(check.kind) is None or entry.id != issue_id(check):
            return None
        return check

    async def _forget_observations(self) -> None:
        """Delete the observations of checks whose desired value is gone (as long as it stays gone)."""
        for key in list(self._cache.actual):
            if self.probing_agent(key.kind) is None:
                continue
            entry = self._cache.desired.get(key)
            if entry is not None and not entry.deleted:
                continue
            absent = Guard(self._keys.desired(key), 0)
            if await self._store.txn(guard=absent, then=[Delete(self._keys.actual(key))]):
                log.info("probe.observation_removed", check=str(key))

    # -- one check --------------------------------------------------------------------------------------------------

    async def _loop(self, check: _Check) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        with structlog.contextvars.bound_contextvars(check=str(check.key)):
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                due = max(due + check.schedule.interval_seconds, loop.time())
                result = await self._probe(check)
                try:
                    await self._record(check, result)
                except Exception as e:  # etcd unavailable, or a bug: this probe's observation only
                    log.warning("probe.observation_write_failed", error_type=type(e).__name__, error=str(e)[:300])

    async def _probe(self, check: _Check) -> ProbeResult:
        assert self._session is not None
        limit = check.schedule.timeout_seconds + PROBE_SLACK_SECONDS
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(limit):
                result = await check.agent.probe(check.resource, session=self._session)
        except TimeoutError:
            result = _failed(f"gave no result within {limit:g} s", started)
        except Exception as e:  # the agent's boundary: a bug, or something no one foresaw an endpoint doing
            log.warning("probe.raised", error_type=type(e).__name__, error=str(e)[:300])
            result = _failed(f"the probe failed: {type(e).__name__}: {str(e)[:150]}", started)
        if self._metrics is not None:
            kind = check.key.kind
            self._metrics.probes.labels(kind=kind, result="passed" if result.ok else "failed").inc()
            self._metrics.probe_duration.labels(kind=kind).observe(result.latency_seconds)
        return result

    async def _record(self, check: _Check, result: ProbeResult) -> None:
        """Count `result`, report or withdraw the issue as it calls for, and write the observation if it changed. A
        write etcd fails costs that write only: the next probe does what is then called for."""
        now = datetime.now(UTC)
        target = self._cache.desired.get(check.schedule.target)
        target_desired = target is not None and not target.deleted
        try:
            await self._count(check, result, now, target_desired=target_desired)
        except Exception as e:  # etcd unavailable, or a bug: the issue write of this probe only
            log.warning("probe.issue_write_failed", error_type=type(e).__name__, error=str(e)[:300])
        await self._observe(check, result, now, target_desired=target_desired)

    async def _count(self, check: _Check, result: ProbeResult, now: datetime, *, target_desired: bool) -> None:
        if result.ok:
            if check.run.failures:
                log.info("probe.passing", after_failures=check.run.failures)
            check.run = _Run(maybe_reported=check.run.maybe_reported or self._standing(check) is not None)
            if check.run.maybe_reported:
                await self._withdraw(check)
            return
        run = check.run
        if run.failures == 0:
            log.info("probe.failing", outcome=result.outcome)
        run.failures += 1
        run.failing_since = run.failing_since or now
        run.counted += 1
        run.counted_since = run.counted_since or now
        if target_desired:
            await self._report(check, result, now)
        elif run.maybe_reported or self._standing(check) is not None:
            run.maybe_reported = True
            await self._withdraw(check)  # a target no longer desired is reported nothing

    def _standing(self, check: _Check) -> IssueEntry | None:
        """The issue of `check` on its target, as the cache holds it."""
        entry = self._cache.issues.get(check.schedule.target, {}).get(check.issue_id)
        return entry if entry is not None and entry.issue.source == check.source else None

    async def _withdraw(self, check: _Check) -> None:
        if await self._store.delete(self._keys.issue(check.schedule.target, check.issue_id)):
            log.info("probe.issue_withdrawn", target=str(check.schedule.target), reason="the check passes")
        check.run.maybe_reported = False

    async def _report(self, check: _Check, result: ProbeResult, now: datetime) -> None:
        """Report the failures on the target once there are enough, or report again when the last report was dealt
        with and the check still fails."""
        run, schedule = check.run, check.schedule
        current = self._cache.issues.get(schedule.target, {}).get(check.issue_id)
        if current is not None and current.issue.source == check.source:
            run.maybe_reported = True
            if not await self._dealt_with(current):
                return  # open, being healed, waiting for approval or held back: the report stands
            if run.dealt_with != current.report:  # dealt with, and still failing: count afresh from this failure
                run.dealt_with = current.report
                run.renewals += 1
                run.counted, run.counted_since = 1, now
        needed = schedule.failure_threshold * min(2 ** max(run.renewals - 1, 0), MAX_RENEWAL_FACTOR)
        if run.counted < needed:
            return
        issue = Issue(
            summary=f"{schedule.what} {result.outcome} ({run.failures} failures in a row)",
            severity="warning",
            source=check.source,
            details={
                **schedule.details, **result.state, "check": check.source, "failures": run.failures,
                "reported_at": _iso(run.counted_since), "failing_since": _iso(run.failing_since),
            },
        )  # fmt: skip
        path = self._keys.issue(schedule.target, check.issue_id)
        value = json.dumps(issue.model_dump(mode="json"), separators=(",", ":"), sort_keys=True).encode()
        run.maybe_reported = True  # from before the write: a write that failed may have been applied
        # Guarded by what the cache holds: a report of ours the watch has not delivered yet is not written twice.
        guard = Guard(path, current.mod_revision if current is not None else 0)
        if await self._store.txn(guard=guard, then=[Put(path, value)]):
            log.warning("probe.issue_reported", target=str(schedule.target), summary=issue.summary,
                        renewal=run.renewals)  # fmt: skip

    async def _dealt_with(self, entry: IssueEntry) -> bool:
        """Whether the target's status says `entry`'s report was dealt with for good (healed, failed, unhealable)."""
        return any(status.done(entry) for status in await self._status.issue_statuses(entry.key))

    async def _observe(self, check: _Check, result: ProbeResult, now: datetime, *, target_desired: bool) -> None:
        """Write the check's state to actual/ if it is not what is there already."""
        run = check.run
        state: dict[str, JsonValue] = {
            "passing": result.ok,
            "consecutive_failures": min(run.failures, check.schedule.failure_threshold),
            "failing_since": _iso(run.failing_since),
            **{f"last_{name}": value for name, value in result.state.items()},
            "target": str(check.schedule.target),
            "target_desired": target_desired,
        }
        if check.written is None:
            cached = self._cache.actual.get(check.key)
            check.written = dict(cached.observed.state) if cached is not None and cached.observed is not None else None
        if state == check.written:
            return
        observed = Observed(kind=check.key.kind, name=check.key.name, state=state, observed_at=now)
        await self._store.put(self._keys.actual(check.key), observed.model_dump_json().encode())
        check.written = state


def _failed(outcome: str, started: float) -> ProbeResult:
    return ProbeResult(
        ok=False, outcome=outcome, state={"status": None, "error": outcome},
        latency_seconds=asyncio.get_running_loop().time() - started,
    )  # fmt: skip
