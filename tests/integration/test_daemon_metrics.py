"""The metrics of a real daemon run, read from its registry's text exposition as Prometheus reads it.

A file converges, then its deletion waits for approval: the counts by phase follow, the step and the plan are
counted with their labels, the work queue and the watch report, and the README's table names exactly the
families the daemon exposes.
"""

from __future__ import annotations

from typing import cast

from harness import Harness, eventually
from prometheus_client import generate_latest
from readme_metrics import documented, exposed

from reconciler.daemon import setpoint_version


def sample(h: Harness, name: str, **labels: str) -> float | None:
    assert h.daemon is not None
    return cast(float | None, h.daemon.metrics.registry.get_sample_value(name, labels))


async def test_a_run_moves_the_metrics_and_exposes_what_the_readme_documents(running: Harness) -> None:
    h = running
    assert h.daemon is not None
    text = generate_latest(h.daemon.metrics.registry).decode()
    assert f'setpoint_build_info{{version="{setpoint_version()}"}} 1.0' in text

    await h.put_desired(h.resource("motd", "hello\n"))
    await h.wait_status("motd", "Converged")

    async def converged_counted() -> bool:
        return sample(h, "setpoint_resources", kind="file", phase="Converged") == 1

    await eventually(converged_counted, what="setpoint_resources to count the converged file")
    assert sample(h, "setpoint_resources", kind="file", phase="Failed") == 0
    assert sample(h, "setpoint_plans_total", risk="low", decision="auto") == 1
    assert sample(h, "setpoint_plan_steps_total", tool="file.write", result="success") == 1
    assert sample(h, "setpoint_plan_step_duration_seconds_count", tool="file.write", result="success") == 1
    adds = sample(h, "setpoint_workqueue_adds_total") or 0
    assert adds >= 1
    taken = sample(h, "setpoint_workqueue_queue_duration_seconds_count") or 0
    assert 1 <= taken <= adds, "a key is taken at most once per add"
    assert sample(h, "setpoint_workqueue_longest_running_processor_seconds") is not None
    assert (sample(h, "setpoint_watch_last_response_timestamp_seconds") or 0) > 0, "the put came through the watch"

    await h.store.delete(h.keys.desired(h.daemon_key("motd")))  # file.delete is high risk: a person decides
    await h.wait_status("motd", "AwaitingApproval")

    async def awaiting_counted() -> bool:
        return sample(h, "setpoint_resources", kind="file", phase="AwaitingApproval") == 1

    await eventually(awaiting_counted, what="setpoint_resources to count the deletion awaiting approval")
    assert sample(h, "setpoint_resources", kind="file", phase="Converged") == 0
    assert sample(h, "setpoint_plans_total", risk="high", decision="approve") == 1

    documented_names = {name: shape[0] for name, shape in documented().items()}
    exposed_names = {name: shape[0] for name, shape in exposed(h.daemon.metrics.registry).items()}
    assert exposed_names == documented_names, "README.md's metric table and the daemon's metrics differ"
