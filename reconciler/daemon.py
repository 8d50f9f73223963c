"""The daemon's lifecycle: start everything in order, run until asked to stop, drain, stop in reverse.

Start: embedded etcd (when no endpoints are configured), the etcd client,
the HTTP endpoint, the reflector (ready once the initial list is cached),
then the observer, the resync timer and the workers. Stop (SIGTERM/SIGINT):
stop taking keys, let each running plan finish its current step and write
its status (bounded by `reconciler.shutdown_timeout_seconds`), then stop the
watch, the HTTP endpoint, the client and the embedded etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import structlog

from plans import ResourceKey
from policies.limits import FlapGuard, MutationBudget
from reconciler.assembly import Assembly, assemble
from reconciler.cache import Cache
from reconciler.clock import SystemClock
from reconciler.controller import Controller
from reconciler.embedded import EmbeddedEtcd, StateDirLock, remove_endpoint_file
from reconciler.executor import Executor
from reconciler.http import HttpServer
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.recovery import find_unfinished
from reconciler.settings import Settings
from reconciler.status import StatusWriter
from reconciler.store import EtcdStore, StoreUnavailableError
from reconciler.systemd import sd_notify
from reconciler.watch import Reflector
from reconciler.workqueue import ExponentialBackoff, WorkQueue

log = structlog.get_logger("setpoint.daemon")


class Daemon:
    """The daemon. `assembly` replaces the built-in agents and tools (for embedding setpoint as a library)."""

    def __init__(self, settings: Settings, *, assembly: Assembly | None = None) -> None:
        self.settings = settings
        self._assembly = assembly
        self.metrics = Metrics()
        self.keys = KeySpace(settings.etcd.prefix)
        self.cache = Cache(self.keys)
        self.embedded: EmbeddedEtcd | None = None
        self.http_port = 0
        self.ready = asyncio.Event()
        self.endpoints: list[str] = list(settings.etcd.endpoints)
        self._lock: StateDirLock | None = None

    async def _start_embedded(self) -> None:
        state_dir = self.settings.resolved_state_dir()
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = StateDirLock(state_dir)
        self._lock.acquire()
        embedded_settings = self.settings.etcd.embedded
        self.embedded = EmbeddedEtcd(
            state_dir / "etcd",
            binary=embedded_settings.binary,
            client_port=embedded_settings.client_port,
            peer_port=embedded_settings.peer_port,
            log_path=state_dir / "etcd.log",
        )
        await self.embedded.astart()
        self.embedded.write_endpoint_file(state_dir)
        self.endpoints = [self.embedded.endpoint]
        log.info("etcd.embedded", endpoint=self.embedded.endpoint, data_dir=str(self.embedded.data_dir))

    async def _connect(self, stop: asyncio.Event) -> EtcdStore | None:
        store = EtcdStore(
            self.endpoints,
            timeout=self.settings.etcd.request_timeout_seconds,
            retry_attempts=self.settings.etcd.retry_attempts,
        )
        await store.connect()
        delay = 0.2
        while not stop.is_set():
            try:
                revision = await store.ping()
            except StoreUnavailableError as e:
                log.warning("etcd.unreachable", endpoints=self.endpoints, error=str(e), retry_in=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("etcd.connected", endpoints=self.endpoints, revision=revision)
            return store
        await store.close()
        return None

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set; returns the exit code."""
        if not self.endpoints:
            await self._start_embedded()
        try:
            store = await self._connect(stop)
            if store is None:
                return 0
            try:
                return await self._serve(store, stop)
            finally:
                await store.close()
        finally:
            if self.embedded is not None:
                remove_endpoint_file(self.settings.resolved_state_dir())
                await asyncio.to_thread(self.embedded.stop)
                log.info("etcd.embedded.stopped")
            if self._lock is not None:
                self._lock.release()

    async def _serve(self, store: EtcdStore, stop: asyncio.Event) -> int:
        s = self.settings
        clock = SystemClock()
        parts = self._assembly or assemble(s)
        queue: WorkQueue[ResourceKey] = WorkQueue(
            backoff=ExponentialBackoff(base=s.reconciler.backoff_base_seconds, cap=s.reconciler.backoff_max_seconds)
        )

        def enqueue(key: ResourceKey) -> None:
            queue.add(key)
            self.metrics.workqueue_depth.set(len(queue))

        reflector = Reflector(
            store=store, keys=self.keys, cache=self.cache, on_change=enqueue, metrics=self.metrics, settings=s.watch
        )
        observer = Observer(
            store=store, keys=self.keys, cache=self.cache, agents=parts.agents, poll_seconds=parts.poll_seconds
        )
        controller = Controller(
            cache=self.cache,
            queue=queue,
            agents=parts.agents,
            tools=parts.tools,
            policies=parts.policies,
            executor=Executor(
                store=store,
                keys=self.keys,
                metrics=self.metrics,
                budget=MutationBudget(
                    per_minute=s.limits.max_mutating_steps_per_minute, now=clock.now, sleep=clock.sleep
                ),
                retries=s.tools,
            ),
            status=StatusWriter(store=store, keys=self.keys),
            observer=observer,
            metrics=self.metrics,
            flap_guard=FlapGuard(
                max_plans=s.limits.flap_max_plans, window=s.limits.flap_window_seconds, now=clock.now
            ),
            limits=s.limits,
            rate_limit_per_second=s.reconciler.rate_limit_per_second,
        )
        http = HttpServer(listen=s.http.listen, metrics=self.metrics, ready=self.ready.is_set)
        await http.start()
        self.http_port = http.port
        log.info("http.listening", address=f"{s.http.listen.rpartition(':')[0]}:{http.port}")
        supervised = [asyncio.create_task(reflector.run(), name="reflector")]
        try:
            if not await self._wait_synced(reflector, stop, supervised[0]):
                return 0 if stop.is_set() else 1
            controller.adopt(await find_unfinished(store, self.keys))
            self.ready.set()
            self.metrics.ready.set(1)
            controller.start(s.reconciler.workers)
            supervised += [
                asyncio.create_task(observer.run(), name="observer"),
                asyncio.create_task(self._resync(enqueue), name="resync"),
            ]
            sd_notify("READY=1")
            log.info("daemon.ready", keys=len(self.cache.desired), workers=s.reconciler.workers)
            code = await self._wait(stop, supervised)
            sd_notify("STOPPING=1")
            log.info("daemon.stopping")
            drained = await controller.shutdown(s.reconciler.shutdown_timeout_seconds)
            if not drained:
                log.error("daemon.drain_timeout", timeout=s.reconciler.shutdown_timeout_seconds)
            return code
        finally:
            for task in supervised:
                task.cancel()
            for task in supervised:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await http.stop()
            log.info("daemon.stopped")

    async def _wait_synced(self, reflector: Reflector, stop: asyncio.Event, task: asyncio.Task[None]) -> bool:
        waiters = {asyncio.ensure_future(reflector.synced.wait()), asyncio.ensure_future(stop.wait()), task}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            if waiter is not task:
                waiter.cancel()
        if task in done:
            self._report_crash(task)
            return False
        return reflector.synced.is_set() and not stop.is_set()

    async def _wait(self, stop: asyncio.Event, supervised: list[asyncio.Task[None]]) -> int:
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *supervised], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        crashed = [task for task in supervised if task in done]
        for task in crashed:
            self._report_crash(task)
        return 1 if crashed else 0

    @staticmethod
    def _report_crash(task: asyncio.Task[None]) -> None:
        error = task.exception() if not task.cancelled() else None
        log.error("daemon.component_stopped", component=task.get_name(), error=repr(error))

    async def _resync(self, enqueue: Callable[[ResourceKey], None]) -> None:
        period = self.settings.reconciler.resync_seconds
        while True:
            # Jitter spreads resyncs of many daemons sharing one etcd.
            await asyncio.sleep(period * random.uniform(0.9, 1.1))
            keys = list(self.cache.resource_keys())
            for key in keys:
                enqueue(key)
            log.info("resync", keys=len(keys))
