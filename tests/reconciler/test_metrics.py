"""The metric set as Prometheus reads it: names, label sets, and values that move when the events happen.

Everything is read back from the text exposition (`generate_latest`), or with `get_sample_value` on the same
registry. The work queue is the real one on a `FakeClock`, so every time it reports is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import cast

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from readme_metrics import documented, exposed

from plans import ResourceKey
from reconciler.clock import FakeClock
from reconciler.keys import KeySpace
from reconciler.metrics import ALERT_RESULTS, HEAL_RESULTS, Metrics
from reconciler.status import Phase, Status, StatusWriter
from reconciler.store import EtcdStore, KeyValue
from reconciler.workqueue import ExponentialBackoff, WorkQueue


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def scraped(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return cast(float | None, metrics.registry.get_sample_value(name, labels))


# -- the table in the README ---------------------------------------------------------------------------------------


def test_the_readme_table_names_every_metric_with_its_type_and_labels() -> None:
    """Every family the code registers, with the type and label names the README gives it, and no other.

    Each labelled metric is given one sample through the README's label names: if they are not the code's,
    prometheus_client refuses them. Families read at scrape get one row each.
    """
    metrics = Metrics(version="1.2.3")
    metrics.count_resources(lambda: {("file", "Converged"): 1})
    metrics.count_open_issues(lambda: {("file", "warning"): 1})
    metrics.count_hook_deliveries(lambda: {"delivered": 1})
    table = documented()
    wrappers = {}
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase):
            family = wrapper.describe()[0]
            wrappers[f"{family.name}_total" if family.type == "counter" else family.name] = wrapper
    for name, (_, labels) in table.items():
        wrapper = wrappers.get(name)
        if wrapper is not None and labels:
            try:
                wrapper.labels(**dict.fromkeys(labels, "x"))
            except ValueError as e:
                pytest.fail(f"the README gives {name} the labels {sorted(labels)}, the code does not: {e}")

    assert exposed(metrics.registry) == table


# -- build info ------------------------------------------------------------------------------------------------------


def test_build_info_is_one_for_the_version_running() -> None:
    assert 'setpoint_build_info{version="1.2.3"} 1.0' in scraped(Metrics(version="1.2.3"))
    dry_run = scraped(Metrics())
    assert "# TYPE setpoint_build_info gauge" in dry_run and "setpoint_build_info{" not in dry_run


# -- the work queue --------------------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def queue(clock: FakeClock, metrics: Metrics) -> AsyncIterator[WorkQueue[str]]:
    q: WorkQueue[str] = WorkQueue(
        clock=clock, backoff=ExponentialBackoff(base=1.0, cap=8.0), observer=metrics.queue_counts()
    )
    metrics.watch_queue(q)
    yield q
    await q.shutdown()


def waited(metrics: Metrics) -> tuple[float | None, float | None]:
    """How many waits the queue reported, and their sum."""
    name = "setpoint_workqueue_queue_duration_seconds"
    return sample(metrics, f"{name}_count"), sample(metrics, f"{name}_sum")


async def test_every_add_is_counted_coalesced_or_not_and_a_delayed_one_when_its_delay_ends(
    queue: WorkQueue[str], clock: FakeClock, metrics: Metrics
) -> None:
    for _ in range(3):
        queue.add("a")
    assert len(queue) == 1
    assert sample(metrics, "setpoint_workqueue_adds_total") == 3
    assert sample(metrics, "setpoint_workqueue_depth") == 1

    queue.add_after("b", 2.0)
    await settle()
    assert sample(metrics, "setpoint_workqueue_adds_total") == 3
    clock.advance(2.0)
    await settle()
    assert sample(metrics, "setpoint_workqueue_adds_total") == 4
    assert sample(metrics, "setpoint_workqueue_depth") == 2

    await queue.shutdown()
    queue.add("c")
    assert sample(metrics, "setpoint_workqueue_adds_total") == 4, "an add refused at shutdown is not counted"
    assert sample(metrics, "setpoint_workqueue_depth") == 0


async def test_each_rate_limited_add_is_a_retry(queue: WorkQueue[str], metrics: Metrics) -> None:
    queue.add_rate_limited("a")
    queue.add_rate_limited("a")
    queue.add_rate_limited("b")
    assert sample(metrics, "setpoint_workqueue_retries_total") == 3
    assert sample(metrics, "setpoint_workqueue_adds_total") == 0, "a retry is an add only once its backoff ends"


async def test_the_time_in_queue_runs_from_when_a_key_can_be_taken_to_when_a_worker_takes_it(
    queue: WorkQueue[str], clock: FakeClock, metrics: Metrics
) -> None:
    queue.add("a")
    clock.advance(1.5)
    queue.add("a")  # already queued: its wait still began at the first add
    clock.advance(0.5)
    assert await queue.get() == "a"
    assert waited(metrics) == (1, 2.0)

    queue.add("a")  # while it is processed: it can be taken only once `done` is called
    clock.advance(4.0)
    queue.done("a")
    clock.advance(0.25)
    assert await queue.get() == "a"
    assert waited(metrics) == (2, 2.25)


async def test_a_delayed_key_waits_in_the_queue_from_when_its_delay_ends(
    queue: WorkQueue[str], clock: FakeClock, metrics: Metrics
) -> None:
    queue.add_after("a", 3.0)
    await settle()
    clock.advance(5.0)  # the delay ended at 3
    await settle()
    clock.advance(1.0)
    assert await queue.get() == "a"
    assert waited(metrics) == (1, 3.0)

    queue.done("a")
    queue.add_rate_limited("a")  # 1 s backoff
    await settle()
    clock.advance(1.0)
    await settle()
    assert await queue.get() == "a"
    assert waited(metrics) == (2, 3.0), "taken the moment its backoff ended"


async def test_the_longest_running_key_is_read_at_scrape(
    queue: WorkQueue[str], clock: FakeClock, metrics: Metrics
) -> None:
    name = "setpoint_workqueue_longest_running_processor_seconds"
    assert sample(metrics, name) == 0
    queue.add("a")
    queue.add("b")
    await queue.get()
    clock.advance(2.0)
    await queue.get()
    clock.advance(3.0)
    assert sample(metrics, name) == 5.0
    queue.done("a")
    assert sample(metrics, name) == 3.0
    queue.done("b")
    assert sample(metrics, name) == 0


# -- families read at scrape -----------------------------------------------------------------------------------------


def test_resources_by_kind_and_phase_come_from_the_status_writer() -> None:
    keys = KeySpace("/sp")
    writer = StatusWriter(store=cast(EtcdStore, None), keys=keys)  # seeded: it never reads these keys

    def stored(kind: str, name: str, value: bytes) -> KeyValue:
        return KeyValue(key=keys.status(ResourceKey(kind=kind, name=name)).encode(), value=value, mod_revision=1)

    def status(phase: Phase) -> bytes:
        return Status(phase=phase, observed_revision=1, updated_at=datetime.now(UTC)).model_dump_json().encode()

    writer.seed(
        [
            stored("file", "a", status(Phase.CONVERGED)),
            stored("file", "b", status(Phase.CONVERGED)),
            stored("file", "c", status(Phase.BLOCKED)),
            stored("process", "d", status(Phase.FAILED)),
            stored("file", "e", b"not json"),  # unreadable: rewritten at its next reconcile, as Pending until then
        ]
    )
    metrics = Metrics()
    metrics.count_resources(writer.phase_counts)

    text = scraped(metrics)
    assert 'setpoint_resources{kind="file",phase="Converged"} 2.0' in text
    assert 'setpoint_resources{kind="file",phase="Blocked"} 1.0' in text
    assert 'setpoint_resources{kind="file",phase="Pending"} 1.0' in text
    assert 'setpoint_resources{kind="process",phase="Failed"} 1.0' in text
    for phase in Phase:  # every phase of a kind is there, at 0 when empty, so none vanishes
        assert sample(metrics, "setpoint_resources", kind="process", phase=phase.value) is not None

    writer.forget(ResourceKey(kind="file", name="c"))  # its status was deleted
    assert sample(metrics, "setpoint_resources", kind="file", phase="Blocked") == 0


def test_open_issues_are_read_at_scrape_and_a_new_reader_replaces_the_old() -> None:
    metrics = Metrics()
    assert "# TYPE setpoint_issues_open gauge" in scraped(metrics), "exposed, without samples, before any reader"
    assert "setpoint_issues_open{" not in scraped(metrics)

    open_issues = {("file", "critical"): 2, ("file", "warning"): 1}
    metrics.count_open_issues(lambda: open_issues)
    assert 'setpoint_issues_open{kind="file",severity="critical"} 2.0' in scraped(metrics)
    open_issues[("file", "critical")] = 0
    assert sample(metrics, "setpoint_issues_open", kind="file", severity="critical") == 0

    metrics.count_open_issues(lambda: {("http_check", "info"): 1})
    assert sample(metrics, "setpoint_issues_open", kind="http_check", severity="info") == 1
    assert sample(metrics, "setpoint_issues_open", kind="file", severity="warning") is None


def test_hook_deliveries_are_read_at_scrape() -> None:
    metrics = Metrics()
    counts = {"delivered": 0, "failed": 0, "dropped": 0}
    metrics.count_hook_deliveries(lambda: counts)
    counts["delivered"] = 3
    assert 'setpoint_hook_deliveries_total{result="delivered"} 3.0' in scraped(metrics)


# -- counters others increment -----------------------------------------------------------------------------------


def test_heals_and_alerts_start_at_zero_for_every_result_and_count_up() -> None:
    metrics = Metrics()
    for result in HEAL_RESULTS:
        assert sample(metrics, "setpoint_heals_total", result=result) == 0
    for result in ALERT_RESULTS:
        assert sample(metrics, "setpoint_alerts_received_total", result=result) == 0
    assert sample(metrics, "setpoint_invalid_issues_total") == 0

    metrics.heals.labels(result="healed").inc()
    metrics.alerts_received.labels(result="reported").inc(2)
    metrics.invalid_issues.inc()

    text = scraped(metrics)
    assert 'setpoint_heals_total{result="healed"} 1.0' in text
    assert 'setpoint_alerts_received_total{result="reported"} 2.0' in text
    assert "setpoint_invalid_issues_total 1.0" in text
