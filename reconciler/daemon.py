"""The daemon's lifecycle: start everything in order, run until asked to stop, drain, stop in reverse.

Start: log the version and every effective setting; take the state
directory (with the embedded etcd) and open the HTTP endpoint first (another
daemon on that directory, or a port that cannot be had, is one sentence and
exit code 1 before anything else is started); start the embedded etcd when no endpoints are
configured (its version is logged, and one older than 3.5 is warned about);
connect (the server's version is logged); take a lease and register under
`members/` (`election.py`); list and watch; then campaign for leadership.

A standby (another daemon leads) keeps its cache warm through the watch,
serves HTTP and delivers webhooks, and queues nothing: it is ready once the
initial list is cached and it knows it does not lead. On winning, the
leader reads what a previous leader or run left unfinished (retried while
etcd blips), queues every key, observes every resource once (then it is
ready), and starts the workers, the observer's polling (which first writes
what the start-up pass observed), the prober (checks) and the resync
timer. Its runtime writes through the store's fenced view, so once the
lease is lost nothing it writes lands. On losing the lease it stops
starting steps at once, lets the running ones finish (their journal writes
may be refused: the next leader settles them as after a crash),
stops the leader's parts, and stands by again with a fresh runtime and a
fresh list, then campaigns again. The HTTP API writes unfenced, as an
operator does: a decision sent to a standby is taken. `assembly.build`
wires the parts.

Every long-running part is supervised, the embedded etcd included. If one
ends, which only a bug or a dead etcd can make happen, the daemon logs which
part and why, drains and stops the rest cleanly, and exits 1, so systemd or
the container runtime restarts it.

Under systemd (`Type=notify`) it says what it is doing in `STATUS=` lines,
sends READY=1 when ready and STOPPING=1 when it drains, and pings the
watchdog from the event loop for the whole run, start-up included
(`reconciler.systemd`).

SIGHUP reloads the policy file: a valid one is in force from the next plan
on; an invalid one is refused with one log line and the old policies stay.

Stop (SIGTERM, SIGINT): stop taking keys,
let each running plan finish its current step and write its status (bounded
by `reconciler.shutdown_timeout_seconds`), revoke the lease (a standby takes
over at once), then stop the watch, the client, the embedded etcd and the
HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Coroutine
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, TypeVar

import structlog

from policies import PolicyError, load_policies
from policies.hooks import read_secret
from reconciler.assembly import Assembly, Runtime, assemble, build
from reconciler.cache import Cache
from reconciler.clock import SystemClock
from reconciler.connect import CredentialsError, open_store
from reconciler.election import Election, Term, member_value
from reconciler.embedded import EmbeddedEtcd, StateDirLock, etcd_version, older_than_supported, remove_endpoint_file
from reconciler.errors import StartupError
from reconciler.heap import building
from reconciler.http import AlertApi, ApprovalApi, HttpServer
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.resync import Resync
from reconciler.settings import Settings
from reconciler.store import EtcdStore, Fence, StoreAccessError, StoreError, StoreUnavailableError
from reconciler.systemd import Notifier

log = structlog.get_logger("setpoint.daemon")


T = TypeVar("T")


async def _done(step: Awaitable[None]) -> bool:
    await step
    return True


async def _without_gc(step: Awaitable[None]) -> None:
    """Run `step`, the start-up pass, which builds an observation of every resource (`heap.building`)."""
    with building():
        await step


def setpoint_version() -> str:
    try:
        return package_version("setpoint")
    except PackageNotFoundError:
        return "unknown"


class Daemon:
    """The daemon. `assembly` replaces the built-in agents and tools (for embedding setpoint as a library)."""

    def __init__(
        self, settings: Settings, *, assembly: Assembly | None = None, systemd: Notifier | None = None
    ) -> None:
        """`systemd`: where to report to systemd; defaults to nowhere (`setpoint run` takes it from the environment)."""
        self.settings = settings
        self._assembly = assembly
        self._systemd = systemd or Notifier()
        self.metrics = Metrics(version=setpoint_version())
        self.keys = KeySpace(settings.etcd.prefix)
        self.cache = Cache(self.keys)
        self.embedded: EmbeddedEtcd | None = None
        self.http_port = 0
        self.ready = asyncio.Event()
        self.endpoints: list[str] = list(settings.etcd.endpoints)
        self.stop_signal: str | None = None  # set by whoever sets `stop` for a signal, for the log
        self._lock: StateDirLock | None = None
        self._parts: Assembly | None = None
        self._runtime: Runtime | None = None
        self._store: EtcdStore | None = None
        self.election: Election | None = None
        self.role: str | None = None  # "leader" or "standby" once known

    def reload_policies(self) -> bool:
        """Read the policy file again and put it in force; False (old policies kept) when it is invalid."""
        path = self.settings.policies.file
        if self._runtime is None or self._parts is None:
            log.warning("policies.reload_skipped", reason="the daemon is still starting")
            return False
        try:
            policies = load_policies(path, known_tools=[tool.name for tool in self._parts.tools])
        except PolicyError as e:
            log.error("policies.reload_refused", error=str(e), advice="the policies in force are unchanged")
            return False
        self._runtime.use_policies(policies)
        self._parts = dataclasses.replace(self._parts, policies=policies)  # and in every runtime built later
        log.info("policies.reloaded", file=path, rules=len(policies.rules))
        return True

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set; returns the exit code."""
        log.info("daemon.starting", version=setpoint_version(), settings=self.settings.model_dump(mode="json"))
        self._systemd.status("starting")
        # The watchdog runs from here on: starting (an embedded etcd, an etcd that does not answer yet) can take a
        # while, and a loop stuck then must be found too.
        async with self._systemd.watchdog():
            # First what is most likely to be refused, before an etcd is started for nothing: the state
            # directory (another daemon has it), then the port.
            if not self.endpoints:
                state_dir = self.settings.resolved_state_dir()
                state_dir.mkdir(parents=True, exist_ok=True)
                self._lock = StateDirLock(state_dir)
                self._lock.acquire()
            try:
                return await self._run(stop)
            finally:
                if self._lock is not None:
                    self._lock.release()

    async def _run(self, stop: asyncio.Event) -> int:
        # The policy file is checked before anything starts: a daemon must not run on policies it cannot read.
        try:
            self._parts = self._assembly or assemble(self.settings, metrics=self.metrics)
        except PolicyError as e:
            raise StartupError(str(e)) from None
        approvals = self.settings.approvals
        try:
            token = read_secret(env=approvals.token_env, file=approvals.token_file, what="the HTTP approval token")
        except ValueError as e:
            raise StartupError(str(e)) from None
        api = ApprovalApi(token=token, keys=self.keys, store=lambda: self._store)
        http = HttpServer(
            listen=self.settings.http.listen, metrics=self.metrics, ready=self._readiness, approvals=api,
            alerts=self._alert_api(),
        )  # fmt: skip
        await http.start()
        self.http_port = http.port
        log.info("http.listening", address=self._http_address())
        try:
            if not self.endpoints:
                await self._start_embedded()
            store = await self._connect(stop)
            if store is None:
                return 0
            self._store = store
            try:
                return await self._serve(store, stop)
            finally:
                self._store = None
                await store.close()
        finally:
            if self.embedded is not None:
                self._systemd.status("stopping the embedded etcd")
                remove_endpoint_file(self.settings.resolved_state_dir())
                await asyncio.to_thread(self.embedded.stop)
                log.info("etcd.embedded.stopped")
            await http.stop()
            log.info("daemon.stopped")

    def _alert_api(self) -> AlertApi | None:
        settings = self.settings.alerts
        if not settings.enabled:
            return None
        try:
            token = read_secret(env=settings.token_env, file=settings.token_file, what="the HTTP alerts token")
        except ValueError as e:
            raise StartupError(str(e)) from None
        host = self.settings.http.listen.rpartition(":")[0].strip("[]")
        if token is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "http.alerts_unauthenticated", listen=self.settings.http.listen,
                advice="anyone who reaches this port can report issues; set alerts.token_file or alerts.token_env",
            )  # fmt: skip
        return AlertApi(token=token, keys=self.keys, store=lambda: self._store)

    async def _start_embedded(self) -> None:
        state_dir = self.settings.resolved_state_dir()
        embedded_settings = self.settings.etcd.embedded
        self._systemd.status(f"starting the embedded etcd in {state_dir / 'etcd'}")
        self.embedded = EmbeddedEtcd(
            state_dir / "etcd",
            binary=embedded_settings.binary,
            client_port=embedded_settings.client_port,
            peer_port=embedded_settings.peer_port,
            log_path=state_dir / "etcd.log",
        )
        version = await asyncio.to_thread(etcd_version, self.embedded.binary)
        log.info("etcd.embedded", binary=self.embedded.binary, etcd_version=version)
        if older_than_supported(version):
            log.warning(
                "etcd.embedded.too_old", binary=self.embedded.binary, etcd_version=version,
                advice="setpoint needs etcd 3.5 or newer; put one first on PATH or set etcd.embedded.binary",
            )  # fmt: skip
        await self.embedded.astart()
        self.embedded.write_endpoint_file(state_dir)
        self.endpoints = [self.embedded.endpoint]
        log.info(
            "etcd.embedded.started", endpoint=self.embedded.endpoint, data_dir=str(self.embedded.data_dir),
            pid=self.embedded.pid,
        )  # fmt: skip

    async def _connect(self, stop: asyncio.Event) -> EtcdStore | None:
        """Connect and wait until etcd answers. A refusal of who we are (password, permission) stops the start:
        waiting would not change it. A failed TLS handshake is waited out like an etcd that is down, its reason
        in every `etcd.unreachable` line: the fix may be on etcd's side."""
        etcd = self.settings.etcd
        try:
            store = open_store(
                etcd, self.endpoints, timeout=etcd.request_timeout_seconds, retry_attempts=etcd.retry_attempts
            )
        except CredentialsError as e:
            raise StartupError(str(e)) from None
        await store.connect()
        delay = 0.2
        where = ", ".join(self.endpoints)
        self._systemd.status(f"connecting to etcd at {where}")
        while not stop.is_set():
            try:
                # A key the daemon's etcd role may read (README: Securing etcd).
                revision = await store.ping(self.keys.section(Section.DESIRED).encode())
                server = await store.server_version()
            except StoreAccessError as e:
                await store.close()
                raise StartupError(str(e)) from None
            except (StoreUnavailableError, StoreError) as e:
                log.warning("etcd.unreachable", endpoints=self.endpoints, error=str(e), retry_in=round(delay, 2))
                self._systemd.status(f"etcd at {where} unreachable, retrying in {delay:.1f} s: {str(e)[:200]}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("etcd.connected", endpoints=self.endpoints, revision=revision, etcd_version=server)
            return store
        self._systemd.stopping("stopping: asked to stop before etcd answered")
        await store.close()
        return None

    async def _serve(self, store: EtcdStore, stop: asyncio.Event) -> int:
        election = Election(
            store=store, keys=self.keys, settings=self.settings.election, metrics=self.metrics,
            member=member_value(version=setpoint_version(), http=self._http_address()),
            takeover=self.embedded is not None,
        )  # fmt: skip
        self.election = election
        parts = [asyncio.create_task(election.run(), name="election")]
        if self.embedded is not None:  # the daemon's own etcd is one of its parts: without it, nothing works
            parts.append(asyncio.create_task(self.embedded.watch(), name="etcd"))
        try:
            code: int | None = None
            while code is None:
                code = await self._spell(store, election, stop, parts)
            return code
        finally:
            for task in parts:
                task.cancel()
            await asyncio.gather(*parts, return_exceptions=True)  # a crash was reported when it happened
            self._systemd.status("stopping: revoking the lease, so that a standby takes over")
            await election.resign()
            self.role = None
            self._systemd.status("stopping: closing the watch and the etcd client")

    async def _spell(
        self, store: EtcdStore, election: Election, stop: asyncio.Event, parts: list[asyncio.Task[None]]
    ) -> int | None:
        """One spell on a fresh runtime: stand by with a warm cache, lead once elected, then drain. The exit code
        when stopped or a part crashed; None when leadership was lost (then the daemon stands by again)."""
        s = self.settings
        assert self._parts is not None
        self.cache = Cache(self.keys)
        won: list[Fence] = []  # the fence of the term this spell wins, if it does

        def fence() -> Fence | None:
            # This spell's term only: a task of this runtime that outlived it can never write under a later term.
            current = election.fence()
            return current if won and current == won[0] else None

        rt = build(
            s, parts=self._parts, store=store.fenced(fence), keys=self.keys, cache=self.cache, metrics=self.metrics,
            clock=SystemClock(), standby=True,
        )  # fmt: skip
        self._runtime = rt
        own = [
            asyncio.create_task(rt.reflector.run(), name="reflector"),
            asyncio.create_task(rt.notifier.run(), name="hooks"),
        ]
        try:
            term = await self._elected(rt, election, stop, [*parts, *own])
            if term is None:  # stopped, or a part crashed, before this daemon led
                code = 0 if stop.is_set() else 1
                if not self.ready.is_set():
                    self._systemd.stopping("stopping before ready" if code == 0 else "a part stopped while starting")
                else:
                    self._systemd.stopping("stopping" if code == 0 else "a part stopped; stopping")
                    log.info("daemon.stopping", signal=self.stop_signal, crashed=code != 0, role=self.role)
                return code
            won.append(term.fence)
            outcome = await self._lead(rt, term, stop, parts, own)
            self._stand_down(term, outcome)
            rt.stopping.set()  # the executor starts no further step
            if not await rt.controller.shutdown(s.reconciler.shutdown_timeout_seconds):
                log.error("daemon.drain_timeout", timeout=s.reconciler.shutdown_timeout_seconds)
            self._systemd.status(f"{'standing down' if outcome is None else 'stopping'}: delivering queued webhooks")
            await rt.notifier.drain(timeout=5.0)  # what the last plans announced
            return outcome
        finally:
            for task in own:
                task.cancel()
            await asyncio.gather(*own, return_exceptions=True)

    async def _elected(
        self, rt: Runtime, election: Election, stop: asyncio.Event, watched: list[asyncio.Task[None]]
    ) -> Term | None:
        """List, then campaign, and stand by (ready) until elected; the term won, or None if stopped or a part
        crashed first."""
        self._systemd.status("listing resources from etcd")
        if not await self._wait_synced(rt, stop, watched):
            return None
        self._systemd.status("campaigning for leadership")
        outcome = await self._unless_stopped(election.campaign(), stop, watched)
        if outcome is None:
            return None
        if outcome.term is not None:
            return outcome.term
        self.role = "standby"
        status = f"standing by: {outcome.leader or 'no daemon (etcd did not answer)'} leads, {self._resources()}"
        if not self.ready.is_set():
            self._became_ready(status)
        else:
            self._systemd.status(status)
        return await self._unless_stopped(election.next_term(), stop, watched)

    async def _lead(
        self, rt: Runtime, term: Term, stop: asyncio.Event, parts: list[asyncio.Task[None]],
        own: list[asyncio.Task[None]],
    ) -> int | None:  # fmt: skip
        """Resume what the last leader left, observe, start the workers and the rest, and queue every key; then
        run until stopped (0), a part crashed (1) or the term ended (None)."""
        watched = [*parts, *own]
        self._systemd.status("resuming what the last run left unfinished")
        if await self._unless_stopped(rt.resumer.load(stop), stop, watched, ended=term.ended) is None:
            return self._why(stop, term)
        rt.lead()  # every key, the unfinished ones among them
        # What has drifted is known before the first plan, so a mass failure is seen as one.
        self._systemd.status(f"observing {len(rt.cache.desired)} resources")
        # Its observations are written by the observer's loop, started with the workers: ready does not wait for
        # etcd to take 100,000 puts, and no plan can be older than what it writes (see Observer.poll_all).
        observed = _without_gc(rt.observer.poll_all(write_later=True))
        if not await self._unless_stopped(_done(observed), stop, watched, ended=term.ended):
            return self._why(stop, term)
        own += [
            asyncio.create_task(rt.controller.run(), name="workers"),
            asyncio.create_task(rt.observer.run(wait_first=True), name="observer"),
            asyncio.create_task(rt.prober.run(), name="prober"),
            asyncio.create_task(self._resync(rt), name="resync"),
        ]
        self.role = "leader"
        if not self.ready.is_set():
            self._became_ready(self._ready_status())
        else:
            self._systemd.status(self._ready_status())
        log.info("daemon.leading", keys=len(rt.cache.desired), workers=self.settings.reconciler.workers)
        return await self._wait(stop, [*parts, *own], ended=term.ended)

    def _became_ready(self, status: str) -> None:
        self.ready.set()
        self.metrics.ready.set(1)
        self._systemd.ready(status)
        log.info("daemon.ready", role=self.role, keys=len(self.cache.desired), workers=self.settings.reconciler.workers)

    def _stand_down(self, term: Term, code: int | None) -> None:
        """Say why the leader parts stop: a stop, a crashed part, or the end of the term."""
        timeout = self.settings.reconciler.shutdown_timeout_seconds
        drain = f"running plans finish their current step (up to {timeout:g} s)"
        if code is None:
            self.role = "standby"
            log.warning("daemon.standing_down", reason=term.why)
            self._systemd.status(f"lost leadership ({term.why}); {drain}, then standing by")
            return
        self._systemd.stopping(f"draining: {drain}" if code == 0 else f"a part stopped; draining: {drain}")
        log.info("daemon.stopping", signal=self.stop_signal, crashed=code != 0)

    @staticmethod
    def _why(stop: asyncio.Event, term: Term) -> int | None:
        """After a wait was cut short: 0 for a stop, None for the end of the term, else 1 (a part crashed)."""
        if stop.is_set():
            return 0
        return None if term.ended.is_set() else 1

    async def _unless_stopped(
        self,
        step: Coroutine[Any, Any, T],
        stop: asyncio.Event,
        parts: list[asyncio.Task[None]],
        *,
        ended: asyncio.Event | None = None,
    ) -> T | None:
        """`step`'s result, or None (`step` cancelled) if a stop, a crashed part or `ended` comes first."""
        task = asyncio.ensure_future(step)
        stoppers = [asyncio.ensure_future(stop.wait())]
        if ended is not None:
            stoppers.append(asyncio.ensure_future(ended.wait()))
        done, _ = await asyncio.wait([task, *stoppers, *parts], return_when=asyncio.FIRST_COMPLETED)
        for stopper in stoppers:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for part in parts:
            if part in done:
                self._report_crash(part)
        return None

    async def _wait_synced(self, rt: Runtime, stop: asyncio.Event, parts: list[asyncio.Task[None]]) -> bool:
        waiters = [asyncio.ensure_future(rt.reflector.synced.wait()), asyncio.ensure_future(stop.wait())]
        done, _ = await asyncio.wait([*waiters, *parts], return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        crashed = [task for task in parts if task in done]
        for task in crashed:
            self._report_crash(task)
        return not crashed and rt.reflector.synced.is_set() and not stop.is_set()

    async def _wait(self, stop: asyncio.Event, parts: list[asyncio.Task[None]], *, ended: asyncio.Event) -> int | None:
        """Until stopped (0), a part crashed (1) or `ended` is set (None)."""
        stoppers = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(ended.wait())]
        done, _ = await asyncio.wait([*stoppers, *parts], return_when=asyncio.FIRST_COMPLETED)
        for stopper in stoppers:
            stopper.cancel()
        crashed = [task for task in parts if task in done]
        for task in crashed:
            self._report_crash(task)
        if crashed:
            return 1
        return 0 if stop.is_set() else None

    @staticmethod
    def _report_crash(task: asyncio.Task[None]) -> None:
        error = task.exception() if not task.cancelled() else None
        log.error("daemon.component_stopped", component=task.get_name(), error=repr(error))

    async def _resync(self, rt: Runtime) -> None:
        resync = Resync(
            keys=rt.cache.resource_keys, enqueue=rt.enqueue, queue=rt.queue,
            period=self.settings.reconciler.resync_seconds,
            on_pass=lambda keys: self._systemd.status(self._ready_status()),
        )  # fmt: skip
        await resync.run()

    def _ready_status(self) -> str:
        return f"ready: leading, {self._resources()}, {self.settings.reconciler.workers} workers"

    def _resources(self) -> str:
        return f"{len(self.cache.desired)} resources"

    def _readiness(self) -> str | None:
        """What /readyz says after `ready: `: whether this daemon leads; None until it is ready."""
        return self.role if self.ready.is_set() else None

    def _http_address(self) -> str:
        return f"{self.settings.http.listen.rpartition(':')[0]}:{self.http_port}"
