"""Prometheus metrics, on a registry owned by the daemon (no import-time global registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.workqueue_depth = Gauge("setpoint_workqueue_depth", "Keys waiting in the work queue.", registry=r)
        self.steps = Counter(
            "setpoint_plan_steps", "Executed plan steps by tool and result.", ["tool", "result"], registry=r
        )
        self.plans = Counter(
            "setpoint_plans", "Plans by policy decision (auto, notify, approve, deny).", ["decision"], registry=r
        )
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
        self.watch_restarts = Counter(
            "setpoint_etcd_watch_restarts", "Watch restarts by reason.", ["reason"], registry=r
        )
        self.ready = Gauge("setpoint_ready", "1 once the initial list is cached.", registry=r)
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
        self.invalid_issues = Counter(
            "setpoint_invalid_issues", "Issue values that could not be read (logged and ignored).", registry=r
        )
        self.heals = Counter(
            "setpoint_heals", "Issue reports by what healing them came to: healed, failed, unhealable, blocked.",
            ["result"], registry=r,
        )  # fmt: skip
        self.alerts_received = Counter(
            "setpoint_alerts_received",
            "Alerts received on POST /v1/alerts, by what became of them: reported, resolved, unchanged, ignored, "
            "invalid.", ["result"], registry=r,
        )  # fmt: skip
        self.tool_retries = Counter(
            "setpoint_tool_retries", "Tool calls retried after a retryable error.", ["tool"], registry=r
        )

    def count_hook_deliveries(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Expose `setpoint_hook_deliveries_total{result}` from the notifier's own counts, read at scrape."""
        self.registry.register(_Deliveries(read))


class _Deliveries:
    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("setpoint_hook_deliveries", "Approval webhook deliveries by result.")]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "setpoint_hook_deliveries", "Approval webhook deliveries by result (delivered, failed, dropped).",
            labels=["result"],
        )  # fmt: skip
        for result, count in self._read().items():
            family.add_metric([result], count)
        yield family
