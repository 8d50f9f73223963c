"""Prometheus metrics, on a registry owned by the daemon (no import-time global registry).

Most metrics are plain counters, gauges and histograms that the component
where the event happens updates. Some are read at scrape instead, from the
state their owner keeps anyway, so they can never disagree with it: the work
queue's depth and longest-running key (`watch_queue`), and the counts given by
`count_resources`, `count_open_issues` and `count_hook_deliveries`. Those
families are registered here, up front, so every name is exposed from the
start (with no samples until their reader is given), and giving a reader
again replaces it.

The work queue knows nothing of Prometheus: it reports to a `QueueCounts`
(`queue_counts`), which has the methods `workqueue.QueueObserver` asks for.

Labels take bounded values only (kinds, phases, tools, results, reasons),
never a key, a name or a plan id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agents.llm import REJECTIONS as LLM_REJECTIONS
from reconciler import alerts
from reconciler.issues import HEALS

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# The closed sets of the counters other components increment, created at 0 so a rate is defined from the start.
HEAL_RESULTS = tuple(state.value for state in HEALS)
ALERT_RESULTS = alerts.RESULTS
LEADERSHIP_LOST = ("lease_gone", "not_renewed", "key_changed")


class QueueState(Protocol):
    """What `watch_queue` reads from the work queue at scrape."""

    def __len__(self) -> int: ...

    def longest_running(self) -> float: ...


class Metrics:
    def __init__(self, *, version: str | None = None) -> None:
        """`version` labels `setpoint_build_info`; without one (a dry run) the family has no sample."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(
            "setpoint_build_info", "Always 1; the version label says which setpoint runs.", ["version"], registry=r
        )
        if version is not None:
            self.build_info.labels(version=version).set(1)
        self.events = Counter(
            "setpoint_events", "etcd watch events applied to the cache, by section and type.",
            ["section", "type"], registry=r,
        )  # fmt: skip
        self.reconciles = Counter(
            "setpoint_reconcile", "Reconciles by kind and outcome.", ["kind", "result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "setpoint_reconcile_duration_seconds", "Time to reconcile one key.", ["kind"],
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self._workqueue(r)
        self.steps = Counter(
            "setpoint_plan_steps", "Executed plan steps by tool and result.", ["tool", "result"], registry=r
        )
        self.step_duration = Histogram(
            "setpoint_plan_step_duration_seconds",
            "Time to run one plan step (its retries included), by tool and result.", ["tool", "result"],
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.plans = Counter(
            "setpoint_plans", "Plans by risk and policy decision (auto, notify, approve, deny).",
            ["risk", "decision"], registry=r,
        )  # fmt: skip
        self.shadow_plans = Counter(
            "setpoint_shadow_plans", "Plans recorded in shadow mode (never run), by kind and what the policy would "
            "have decided.", ["kind", "decision"], registry=r,
        )  # fmt: skip
        self.approvals_pending = Gauge(
            "setpoint_approvals_pending", "Plans awaiting a person's approval.", registry=r
        )
        self.approvals_oldest_age = Gauge(
            "setpoint_approvals_oldest_age_seconds", "Age of the oldest plan awaiting approval (0: none).", registry=r
        )
        self.approvals = Counter(
            "setpoint_approvals",
            "Plans awaiting approval, by how it ended: approved, rejected, expired, voided, replanned; and "
            "decisions refused (refused).", ["result"], registry=r,
        )  # fmt: skip
        self.invalid_keys = Counter(
            "setpoint_invalid_keys", "Keys under desired/ or actual/ that do not fit the key layout.", registry=r
        )
        self.etcd_revision = Gauge("setpoint_etcd_revision", "Last etcd revision seen by the watch.", registry=r)
        self.watch_last_response = Gauge(
            "setpoint_watch_last_response_timestamp_seconds",
            "Unix time of the last watch response (events or progress notification); 0 before the first.",
            registry=r,
        )  # fmt: skip
        self.watch_restarts = Counter(
            "setpoint_etcd_watch_restarts", "Watch restarts by reason.", ["reason"], registry=r
        )
        self.ready = Gauge("setpoint_ready", "1 once the initial list is cached.", registry=r)
        self.leader = Gauge(
            "setpoint_leader", "1 while this daemon leads the prefix (holds the leader lease), 0 otherwise.",
            ["prefix"], registry=r,
        )  # fmt: skip
        self.leadership_lost = Counter(
            "setpoint_leadership_lost",
            "Terms of leadership this daemon lost, by reason: lease_gone (etcd says the lease expired), not_renewed "
            "(no renewal within election.renew_seconds), key_changed (the leader key was deleted or replaced).",
            ["reason"], registry=r,
        )  # fmt: skip
        for reason in LEADERSHIP_LOST:
            self.leadership_lost.labels(reason=reason)
        self.flap_guard_blocked = Counter(
            "setpoint_flap_guard_blocked", "Plans not run because the key hit the flap guard.", ["kind"], registry=r
        )
        self.healing_paused = Counter(
            "setpoint_healing_paused",
            "Healing plans not run because too large a share of the kind needs healing.", ["kind"], registry=r,
        )  # fmt: skip
        self.mutation_wait = Counter(
            "setpoint_mutation_budget_wait_seconds",
            "Seconds steps waited for the global mutating-steps-per-minute budget.", registry=r,
        )  # fmt: skip
        self.tool_retries = Counter(
            "setpoint_tool_retries", "Tool calls retried after a retryable error.", ["tool"], registry=r
        )
        self._health(r)
        self._llm(r)
        self._hook_deliveries = _Counts(
            "setpoint_hook_deliveries", "Approval webhook deliveries by result (delivered, failed, dropped).",
            ["result"], counter=True,
        )  # fmt: skip
        r.register(self._hook_deliveries)

    def _workqueue(self, r: CollectorRegistry) -> None:
        self.workqueue_depth = Gauge(
            "setpoint_workqueue_depth", "Keys in the work queue that a worker can take now.", registry=r
        )
        self.workqueue_adds = Counter(
            "setpoint_workqueue_adds", "Adds to the work queue, whether or not the key was queued already.", registry=r
        )
        self.workqueue_retries = Counter(
            "setpoint_workqueue_retries", "Keys sent back to the work queue with a backoff after a failure.", registry=r
        )
        self.workqueue_queue_duration = Histogram(
            "setpoint_workqueue_queue_duration_seconds",
            "Time a key waited in the work queue, from when it could be taken to when a worker took it.",
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.workqueue_longest_running = Gauge(
            "setpoint_workqueue_longest_running_processor_seconds",
            "How long the longest reconcile under way has been running (0: none).", registry=r,
        )  # fmt: skip

    def _health(self, r: CollectorRegistry) -> None:
        """What state the resources are in, and what was reported and done about them."""
        self._resources = _Counts(
            "setpoint_resources", "Resources by kind and status phase.", ["kind", "phase"], counter=False
        )
        r.register(self._resources)
        self._issues_open = _Counts(
            "setpoint_issues_open", "Open issues by kind and severity.", ["kind", "severity"], counter=False
        )
        r.register(self._issues_open)
        self.heals = Counter(
            "setpoint_heals", "Issue reports by what healing them came to: healed, failed, unhealable, blocked.",
            ["result"], registry=r,
        )  # fmt: skip
        for result in HEAL_RESULTS:
            self.heals.labels(result=result)
        self.invalid_issues = Counter(
            "setpoint_invalid_issues", "Issue values that could not be read (logged and ignored).", registry=r
        )
        self.alerts_received = Counter(
            "setpoint_alerts_received", "Alerts received on POST /v1/alerts, by what became of each.", ["result"],
            registry=r,
        )  # fmt: skip
        for result in ALERT_RESULTS:
            self.alerts_received.labels(result=result)
        self.probes = Counter(
            "setpoint_probes", "Probes of checks (http_check) by kind and result: passed, failed.", ["kind", "result"],
            registry=r,
        )  # fmt: skip
        self.probe_duration = Histogram(
            "setpoint_probe_duration_seconds", "Time one probe of a check took, failed ones included.", ["kind"],
            buckets=_DURATION_BUCKETS, registry=r,
        )  # fmt: skip

    def _llm(self, r: CollectorRegistry) -> None:
        """Language-model planning: calls, tokens, cost, time, cache hits, budget left, rejected answers."""
        self.llm_requests = Counter(
            "setpoint_llm_requests", "Calls to language models, by provider, model, tier and result.",
            ["provider", "model", "tier", "result"], registry=r,
        )  # fmt: skip
        self.llm_tokens = Counter(
            "setpoint_llm_tokens", "Tokens sent to (input) and received from (output) language models.",
            ["provider", "model", "direction"], registry=r,
        )  # fmt: skip
        self.llm_cost = Counter(
            "setpoint_llm_cost_usd", "What language-model calls cost, in USD, at the configured prices.",
            ["provider", "model"], registry=r,
        )  # fmt: skip
        self.llm_request_duration = Histogram(
            "setpoint_llm_request_duration_seconds", "Time one call to a language model took, failed ones included.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.llm_plan_cache_hits = Counter(
            "setpoint_llm_plan_cache_hits", "Plans (or failures to plan) reused from the plan cache, without a call.",
            registry=r,
        )  # fmt: skip
        self._llm_budget = _Counts(
            "setpoint_llm_budget_remaining_usd",
            "What is left of the hourly language-model budget (no sample when there is no budget).", [],
            counter=False,
        )  # fmt: skip
        r.register(self._llm_budget)
        self.llm_rejected = Counter(
            "setpoint_llm_rejected_answers", "Model answers rejected by validation, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in LLM_REJECTIONS:
            self.llm_rejected.labels(reason=reason)

    def llm_budget_remaining(self, read: Callable[[], float | None]) -> None:
        """Expose `setpoint_llm_budget_remaining_usd` from `read()` at scrape; no sample while it is None."""
        self._llm_budget.read = lambda: [((), value)] if (value := read()) is not None else []

    def llm_events(self) -> LlmCounts:
        """What the router reports its calls and rejections to."""
        return LlmCounts(self)

    def queue_counts(self) -> QueueCounts:
        """What the work queue reports its adds, retries and waits to."""
        return QueueCounts(self)

    def watch_queue(self, queue: QueueState) -> None:
        """Expose the queue's depth and its longest-running key, read at scrape."""
        self.workqueue_depth.set_function(lambda: len(queue))
        self.workqueue_longest_running.set_function(queue.longest_running)

    def count_hook_deliveries(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose `setpoint_hook_deliveries_total{result}` from the notifier's own counts, read at scrape."""
        self._hook_deliveries.read = lambda: [((result,), n) for result, n in read().items()]

    def count_resources(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Expose `setpoint_resources{kind, phase}` from `read()`, keyed by (kind, phase), read at scrape."""
        self._resources.read = lambda: read().items()

    def count_open_issues(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Expose `setpoint_issues_open{kind, severity}` from `read()`, keyed by (kind, severity), read at scrape."""
        self._issues_open.read = lambda: read().items()


class QueueCounts:
    """The work queue's `QueueObserver`: its events, as the `setpoint_workqueue_*` metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def added(self) -> None:
        self._metrics.workqueue_adds.inc()

    def retried(self) -> None:
        self._metrics.workqueue_retries.inc()

    def taken(self, waited: float) -> None:
        self._metrics.workqueue_queue_duration.observe(waited)


class LlmCounts:
    """The router's `RouterEvents`: its calls and rejected answers, as the `setpoint_llm_*` metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def request(
        self, *, provider: str, model: str, tier: str, result: str, seconds: float, input_tokens: int,
        output_tokens: int, cost_usd: float,
    ) -> None:  # fmt: skip
        m = self._metrics
        m.llm_requests.labels(provider=provider, model=model, tier=tier, result=result).inc()
        m.llm_request_duration.observe(seconds)
        m.llm_tokens.labels(provider=provider, model=model, direction="input").inc(input_tokens)
        m.llm_tokens.labels(provider=provider, model=model, direction="output").inc(output_tokens)
        m.llm_cost.labels(provider=provider, model=model).inc(cost_usd)

    def rejected(self, reason: str) -> None:
        self._metrics.llm_rejected.labels(reason=reason).inc()


class _Counts:
    """A family read at scrape from `read()`: a count for each tuple of label values."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], *, counter: bool) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._counter = counter
        self.read: Callable[[], Iterable[tuple[Sequence[str], float]]] = list  # label values and count

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, count in self.read():
            family.add_metric(list(values), count)
        yield family

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        kind = CounterMetricFamily if self._counter else GaugeMetricFamily
        return kind(self._name, self._documentation, labels=self._labels)
