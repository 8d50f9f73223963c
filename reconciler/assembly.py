"""Start-up assembly: the one place where the daemon's parts are built and wired together.

`assemble` builds the agents, tools and policies from settings (a library
user passes their own `Assembly` instead). `build` wires the runtime around
them: cache and watch, work queue, observer, status writer, journal,
executor, gate, runner, crash recovery, reconciler and controller. Nothing
registers itself on import, and no component reaches into another to find
its collaborators: adding an agent or a stage means adding it here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from plans import ResourceKey
from policies import PolicySet, RiskCeiling
from policies.limits import FlapGuard, MutationBudget
from reconciler.cache import Cache
from reconciler.claims import ClaimIndex
from reconciler.clock import Clock
from reconciler.controller import Controller
from reconciler.executor import Executor
from reconciler.gate import Gate
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.reconcile import Reconciler
from reconciler.resume import Resumer, Unfinished
from reconciler.runner import Runner
from reconciler.settings import Settings
from reconciler.status import StatusWriter
from reconciler.store import EtcdStore
from reconciler.watch import Reflector
from reconciler.workqueue import ExponentialBackoff, WorkQueue
from tools import ToolRegistry


@dataclass(frozen=True, slots=True)
class Assembly:
    agents: AgentRegistry
    tools: ToolRegistry
    policies: PolicySet
    poll_seconds: dict[str, float]


def assemble(settings: Settings) -> Assembly:
    file_agent = FileAgent(allowed_roots=settings.agents.file.allowed_roots)
    agents = AgentRegistry([file_agent])
    return Assembly(
        agents=agents,
        tools=ToolRegistry(agents.tools()),
        policies=PolicySet([RiskCeiling(settings.reconciler.max_auto_risk)]),
        poll_seconds={"file": settings.agents.file.poll_seconds},
    )


@dataclass(frozen=True, slots=True)
class Runtime:
    """The running daemon's parts; `stopping` is set when shutdown begins."""

    queue: WorkQueue[ResourceKey]
    reflector: Reflector
    observer: Observer
    resumer: Resumer
    status: StatusWriter
    reconciler: Reconciler
    controller: Controller
    stopping: asyncio.Event
    enqueue: Callable[[ResourceKey], None]  # what the watch calls for every changed key


def build(
    settings: Settings,
    *,
    parts: Assembly,
    store: EtcdStore,
    keys: KeySpace,
    cache: Cache,
    metrics: Metrics,
    clock: Clock,
) -> Runtime:
    s = settings
    queue: WorkQueue[ResourceKey] = WorkQueue(
        backoff=ExponentialBackoff(base=s.reconciler.backoff_base_seconds, cap=s.reconciler.backoff_max_seconds)
    )
    claims = ClaimIndex(agents=parts.agents, cache=cache)

    def on_change(key: ResourceKey) -> None:
        # A claim that appeared or went away changes what the other claimants may do.
        for other in claims.update(key):
            queue.add(other)
        queue.add(key)
        metrics.workqueue_depth.set(len(queue))

    stopping = asyncio.Event()
    status = StatusWriter(store=store, keys=keys)
    journal = PlanJournal(store=store, keys=keys, status=status)
    observer = Observer(
        store=store, keys=keys, cache=cache, agents=parts.agents, poll_seconds=parts.poll_seconds,
        timeout=s.reconciler.observe_timeout_seconds,
    )  # fmt: skip
    budget = MutationBudget(per_minute=s.limits.max_mutating_steps_per_minute, now=clock.now, sleep=clock.sleep)
    flap = FlapGuard(max_plans=s.limits.flap_max_plans, window=s.limits.flap_window_seconds, now=clock.now)
    unfinished = Unfinished()
    executor = Executor(journal=journal, metrics=metrics, budget=budget, stopping=stopping, retries=s.tools)
    runner = Runner(
        executor=executor, journal=journal, status=status, observer=observer, cache=cache, keys=keys,
        flap=flap, unfinished=unfinished,
    )  # fmt: skip
    resumer = Resumer(
        store=store, keys=keys, tools=parts.tools, status=status, journal=journal, runner=runner,
        unfinished=unfinished, cache=cache, flap=flap, observer=observer,
    )  # fmt: skip
    gate = Gate(
        tools=parts.tools, policies=parts.policies, flap=flap, budget=budget, observer=observer, cache=cache,
        limits=s.limits, metrics=metrics,
    )  # fmt: skip
    reconciler = Reconciler(
        cache=cache, agents=parts.agents, claims=claims, observer=observer, gate=gate, runner=runner,
        resumer=resumer, unfinished=unfinished, status=status,
    )  # fmt: skip
    controller = Controller(
        queue=queue, reconcile=reconciler.reconcile, metrics=metrics, workers=s.reconciler.workers,
        rate_limit_per_second=s.reconciler.rate_limit_per_second,
    )  # fmt: skip
    reflector = Reflector(store=store, keys=keys, cache=cache, on_change=on_change, metrics=metrics, settings=s.watch)
    return Runtime(
        queue=queue, reflector=reflector, observer=observer, resumer=resumer, status=status, reconciler=reconciler,
        controller=controller, stopping=stopping, enqueue=on_change,
    )  # fmt: skip
