"""Start-up assembly: the one place where the daemon's parts are built and wired together.

`assemble` builds the agents, tools and policies from settings (a library
user passes their own `Assembly` instead), and, when `llm.tiers` names any
model, the language-model planner: the file agent asks it about issues its
rules cannot heal, and each kind in `llm.kinds` gets a `ModelAgent` with the
tools named there. Nothing else knows a model is involved. The declarative
tools in `tools.definitions` are registered beside the built-in ones, and
the planner offers each to the model for the kinds it names. `build` wires the runtime around
them: cache and watch, work queue, observer, prober (told of every changed key, as the queue is), status writer,
journal, executor, gate, runner, crash recovery, reconciler and controller. Nothing
registers itself on import, and no component reaches into another to find
its collaborators: adding an agent or a stage means adding it here.

A runtime built `standby` keeps its cache (and the index of claims) up to
date but queues nothing: not the watch's changes, not a process agent's
notifications. `Runtime.lead` switches it to queueing and queues every key.
The daemon builds a fresh runtime for each spell as standby and leader
(`daemon.py`), on the store's fenced view, so nothing one term learnt
outlives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from agents import AgentRegistry, NotifyingAgent
from agents.builtin.file import FileAgent
from agents.builtin.http_check import HttpCheckAgent
from agents.builtin.process import ProcessAgent
from agents.llm import ModelAgent, ModelPlanner
from agents.plancache import PlanCache
from llm_router import NoEvents, RouterEvents
from llm_router.redact import Redactor
from llm_router.router import build_router
from plans import ResourceKey, Snapshot
from policies import Policies, load_policies
from policies.hooks import Notifier, Webhook, read_secret
from policies.limits import FlapGuard, MutationBudget
from reconciler.approvals import Approvals
from reconciler.cache import Cache
from reconciler.claims import ClaimIndex
from reconciler.clock import Clock
from reconciler.controller import Controller
from reconciler.errors import StartupError
from reconciler.executor import Executor
from reconciler.gate import Gate
from reconciler.journal import PlanJournal
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.probes import Prober
from reconciler.reconcile import Reconciler
from reconciler.resume import Resumer, Unfinished
from reconciler.rollback import Rollbacks
from reconciler.runner import Runner
from reconciler.settings import Settings
from reconciler.shadow import ShadowMode, Shadows
from reconciler.status import Phase, StatusWriter
from reconciler.store import EtcdStore
from reconciler.verify import Verifier
from reconciler.watch import Reflector
from reconciler.workqueue import ExponentialBackoff, WorkQueue
from tools import Tool, ToolRegistry
from tools.declarative import DeclaredTool, ToolDefinitionError, check_kinds, load_tools
from tools.declarative import register as register_declared


@dataclass(frozen=True, slots=True)
class Assembly:
    agents: AgentRegistry
    tools: ToolRegistry
    policies: Policies
    poll_seconds: dict[str, float]
    planner: ModelPlanner | None = None
    shadow: ShadowMode = field(default_factory=ShadowMode)


def assemble(settings: Settings, *, metrics: Metrics | None = None, models: bool = True) -> Assembly:
    """The built-in agents and tools, the declarative tools, the model planner when models are configured, and
    the policies in `policies.file` (PolicyError when it is invalid). `models=False` leaves the planner out and
    does not look up declarative tools' programs and secrets (commands that plan nothing, so need no API key and
    no tool secret); StartupError when a model's key or SDK is missing, or a tool definition is invalid."""
    declared = _declared(settings, resolve_host=models)
    by_kind: dict[str, list[Tool]] = {}
    for tool in declared:
        for kind in sorted(tool.kinds):
            by_kind.setdefault(kind, []).append(tool)
    planner = _planner(settings, metrics, by_kind) if models and settings.llm.tiers.configured else None
    file_agent = FileAgent(allowed_roots=settings.agents.file.allowed_roots, fallback=planner)
    checks = settings.agents.http_check
    http_check = HttpCheckAgent(max_body_bytes=checks.max_body_bytes, min_interval_seconds=checks.min_interval_seconds)
    agents = AgentRegistry([file_agent, _process_agent(settings, planner), http_check])
    tools = ToolRegistry(agents.tools())
    try:
        register_declared(tools, declared)
    except ToolDefinitionError as e:
        raise StartupError(str(e)) from None
    for kind, config in settings.llm.kinds.items():
        offered = []
        for name in config.tools:
            if name not in tools:
                known = ", ".join(t.name for t in tools)
                raise StartupError(f"llm.kinds.{kind}.tools: no tool is named {name!r} (the tools are: {known})")
            offered.append(tools.get(name))
        try:
            agents.register(ModelAgent(kind=kind, tools=offered, planner=planner, hint=config.hint))
        except ValueError as e:
            raise StartupError(f"llm.kinds.{kind}: {e}") from None
    try:
        check_kinds(declared, agents.kinds)
    except ToolDefinitionError as e:
        raise StartupError(str(e)) from None
    return Assembly(
        agents=agents,
        tools=tools,
        policies=load_policies(settings.policies.file, known_tools=[tool.name for tool in tools]),
        poll_seconds={"file": settings.agents.file.poll_seconds, "process": settings.agents.process.poll_seconds},
        planner=planner,
        shadow=shadow_mode(settings),
    )


def shadow_mode(settings: Settings) -> ShadowMode:
    """The agents, kinds and planner whose plans are recorded, never run (`mode: shadow`)."""
    groups = settings.agents.model_dump()
    return ShadowMode(
        agents=frozenset(name for name, group in groups.items() if group.get("mode") == "shadow"),
        kinds=frozenset(kind for kind, config in settings.llm.kinds.items() if config.mode == "shadow"),
        models=settings.llm.mode == "shadow",
    )


def _declared(settings: Settings, *, resolve_host: bool) -> list[DeclaredTool]:
    """The tools in `tools.definitions`; StartupError naming file, line, tool and field. Without
    `resolve_host`, programs and secrets are not looked up (for commands that run no tool)."""
    try:
        return load_tools(
            settings.tools.definitions, allowed_executables=settings.tools.allowed_executables,
            resolve_host=resolve_host,
        )  # fmt: skip
    except ToolDefinitionError as e:
        raise StartupError(str(e)) from None


def _process_agent(settings: Settings, planner: ModelPlanner | None) -> ProcessAgent:
    process = settings.agents.process
    state = settings.resolved_state_dir()
    return ProcessAgent(
        allowed_executables=process.allowed_executables, state_dir=process.state_dir or state / "processes",
        log_dir=process.log_dir or state / "logs", fallback=planner,
    )  # fmt: skip


def _planner(settings: Settings, metrics: Metrics | None, extra_tools: dict[str, list[Tool]]) -> ModelPlanner:
    llm = settings.llm
    events: RouterEvents = metrics.llm_events() if metrics is not None else NoEvents()
    try:
        router = build_router(llm, events=events, redactor=Redactor(key_patterns=llm.redact_keys))
    except ValueError as e:
        raise StartupError(str(e)) from None
    if metrics is not None:
        metrics.llm_budget_remaining(router.budget_remaining)
    return ModelPlanner(
        router=router, redactor=router.redactor, max_steps=llm.max_steps,
        cache=PlanCache(ttl_seconds=llm.plan_cache.ttl_seconds, max_entries=llm.plan_cache.max_entries),
        on_cache_hit=metrics.llm_plan_cache_hits.inc if metrics is not None else lambda: None,
        extra_tools=extra_tools,
    )  # fmt: skip


def webhooks(settings: Settings) -> list[Webhook]:
    """The approval webhooks, with their secrets read (StartupError naming the hook when one cannot be)."""
    hooks = []
    for index, hook in enumerate(settings.approvals.webhooks):
        try:
            secret = read_secret(env=hook.secret_env, file=hook.secret_file, what=f"approvals.webhooks.{index}")
        except ValueError as e:
            raise StartupError(str(e)) from None
        hooks.append(
            Webhook(url=hook.url, secret=secret, format=hook.format, timeout_seconds=hook.timeout_seconds,
                    attempts=hook.attempts)
        )  # fmt: skip
    return hooks


def public_url(settings: Settings) -> str | None:
    """Where approvers reach the HTTP API: `approvals.public_url`, else the listen address; None when the
    HTTP approval routes are off (no token), so webhooks carry no URLs that can only answer 403."""
    approvals = settings.approvals
    if approvals.token_env is None and approvals.token_file is None:
        return None
    return (approvals.public_url or f"http://{settings.http.listen}").rstrip("/")


async def _planning(status: StatusWriter, snapshot: Snapshot, message: str) -> None:
    """Phase `Planning` while a model is asked (written only if the desired value is still `snapshot`'s)."""
    await status.write(
        snapshot.key, phase=Phase.PLANNING, revision=snapshot.revision, deleted=snapshot.deleted, message=message
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
    gate: Gate
    approvals: Approvals
    notifier: Notifier
    flap: FlapGuard
    budget: MutationBudget
    prober: Prober
    cache: Cache
    leading: asyncio.Event  # clear while standing by: changes update the cache and the claims, nothing is queued

    def lead(self) -> None:
        """Start queueing, and queue every key: each desired value (tombstones included) and each resource with
        a status (read by `resumer.load`, which comes first)."""
        self.leading.set()
        for key in dict.fromkeys([*self.cache.resource_keys(), *self.status.keys()]):
            self.enqueue(key)

    def use_policies(self, policies: Policies) -> None:
        """Put `policies` in force (a reload): decisions from the next plan on, limits at once."""
        self.gate.policies = policies
        self.flap.configure(max_plans=policies.limits.flap_max_plans, window=policies.limits.flap_window_seconds)
        self.budget.configure(per_minute=policies.limits.max_mutating_steps_per_minute)


def build(
    settings: Settings,
    *,
    parts: Assembly,
    store: EtcdStore,
    keys: KeySpace,
    cache: Cache,
    metrics: Metrics,
    clock: Clock,
    standby: bool = False,
) -> Runtime:
    """The runtime on `store` (the daemon's fenced view); `standby`: it queues nothing until `Runtime.lead`."""
    s = settings
    leading = asyncio.Event()
    if not standby:
        leading.set()
    queue: WorkQueue[ResourceKey] = WorkQueue(
        backoff=ExponentialBackoff(base=s.reconciler.backoff_base_seconds, cap=s.reconciler.backoff_max_seconds),
        observer=metrics.queue_counts(),
    )
    metrics.watch_queue(queue)
    claims = ClaimIndex(agents=parts.agents, cache=cache)

    def on_change(key: ResourceKey) -> None:
        # A claim that appeared or went away changes what the other claimants may do.
        others = claims.update(key)
        if not leading.is_set():
            return
        for other in others:
            queue.add(other)
        queue.add(key)
        prober.notify(key)

    for agent in parts.agents:  # an agent that hears of changes itself (a process exited) queues them at once
        if isinstance(agent, NotifyingAgent):
            agent.subscribe(on_change)  # replaces the subscriber of an earlier runtime
    stopping = asyncio.Event()
    status = StatusWriter(
        store=store, keys=keys, open_issues=cache.open_issues,
        on_heal=lambda state: metrics.heals.labels(result=state.value).inc(),
    )  # fmt: skip
    if parts.planner is not None:
        parts.planner.on_planning = lambda snapshot, message: _planning(status, snapshot, message)
    prober = Prober(
        store=store, keys=keys, cache=cache, agents=parts.agents, status=status, metrics=metrics,
        sweep_seconds=s.agents.http_check.sweep_seconds,
    )  # fmt: skip
    metrics.count_resources(status.phase_counts)
    metrics.count_open_issues(cache.issue_counts)
    journal = PlanJournal(store=store, keys=keys, status=status)
    observer = Observer(
        store=store, keys=keys, cache=cache, agents=parts.agents, poll_seconds=parts.poll_seconds,
        timeout=s.reconciler.observe_timeout_seconds,
    )  # fmt: skip
    limits = parts.policies.limits
    budget = MutationBudget(per_minute=limits.max_mutating_steps_per_minute, now=clock.now, sleep=clock.sleep)
    flap = FlapGuard(max_plans=limits.flap_max_plans, window=limits.flap_window_seconds, now=clock.now)
    notifier = Notifier(webhooks(s), public_url=public_url(s))
    metrics.count_hook_deliveries(
        lambda: {"delivered": notifier.delivered, "failed": notifier.failed, "dropped": notifier.dropped}
    )
    approvals = Approvals(
        store=store, keys=keys, cache=cache, status=status, journal=journal, metrics=metrics, notifier=notifier,
        ttl_seconds=s.approvals.plan_ttl_seconds,
    )  # fmt: skip
    unfinished = Unfinished()
    executor = Executor(
        journal=journal, metrics=metrics, budget=budget, stopping=stopping, retries=s.tools, tools=parts.tools,
        redactor=Redactor(key_patterns=s.llm.redact_keys), decide=lambda plan, labels: gate.decide(plan, labels),
        may_act=store.fence_holds,
    )  # fmt: skip
    runner = Runner(
        executor=executor, journal=journal, status=status, observer=observer, cache=cache, keys=keys,
        flap=flap, unfinished=unfinished, verifier=Verifier(agents=parts.agents, cache=cache),
        rollbacks=Rollbacks(tools=parts.tools, approvals=approvals),
    )  # fmt: skip
    resumer = Resumer(
        store=store, keys=keys, tools=parts.tools, status=status, journal=journal, runner=runner,
        unfinished=unfinished, cache=cache, flap=flap, observer=observer, approvals=approvals, shadow=parts.shadow,
    )  # fmt: skip
    gate = Gate(
        tools=parts.tools, policies=parts.policies, flap=flap, budget=budget, observer=observer, cache=cache,
        metrics=metrics, shadow=parts.shadow,
    )  # fmt: skip
    reconciler = Reconciler(
        cache=cache, agents=parts.agents, claims=claims, observer=observer, gate=gate, runner=runner,
        resumer=resumer, unfinished=unfinished, status=status, approvals=approvals, journal=journal,
        shadows=Shadows(journal=journal, status=status, metrics=metrics),
        store=store, keys=keys,
    )  # fmt: skip
    controller = Controller(
        queue=queue, reconcile=reconciler.reconcile, metrics=metrics, workers=s.reconciler.workers,
        rate_limit_per_second=s.reconciler.rate_limit_per_second,
    )  # fmt: skip

    def on_approval(plan_id: str) -> None:
        key = approvals.resource_of(plan_id)
        if key is not None:  # a decision on a plan nobody waits for is refused by whoever wrote it
            on_change(key)

    reflector = Reflector(
        store=store, keys=keys, cache=cache, on_change=on_change, on_approval=on_approval, metrics=metrics,
        settings=s.watch,
    )  # fmt: skip
    return Runtime(
        queue=queue, reflector=reflector, observer=observer, resumer=resumer, status=status, reconciler=reconciler,
        controller=controller, stopping=stopping, enqueue=on_change, gate=gate, approvals=approvals,
        notifier=notifier, flap=flap, budget=budget, prober=prober, cache=cache, leading=leading,
    )  # fmt: skip
