"""What a change costs in etcd requests: a one-step plan is two, its begin and its settle.

Every request the daemon's own etcd client makes between a desired change
and its `Converged` status is counted (the test's client is not). The poll
interval is long, so only the reconcile is counted. Before issue 6 a change
needing one file write cost six sequential requests (status Executing, plan
record, journal running, journal succeeded, status Converged, actual), plus a
read of the status the first time a key was seen.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import pytest
from harness import Harness, eventually

from reconciler.store import EtcdStore

REQUESTS = ("get", "range", "put", "put_all", "delete", "txn", "ping", "server_version")


@pytest.fixture
def counted(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Requests made by any etcd client but the test's own, by method."""
    counts: Counter[str] = Counter()
    for name in REQUESTS:
        method = getattr(EtcdStore, name)

        @functools.wraps(method)
        async def counting(self: EtcdStore, *args: Any, __method: Any = method, __name: str = name, **kw: Any) -> Any:
            if self is not harness.store:
                counts[__name] += 1
            return await __method(self, *args, **kw)

        monkeypatch.setattr(EtcdStore, name, counting)
    return counts


async def test_a_change_that_needs_one_file_write_costs_two_etcd_requests(
    harness: Harness, counted: Counter[str]
) -> None:
    harness.settings = harness.settings.model_copy(
        update={"agents": harness.settings.agents.model_copy(update={"file": harness.settings.agents.file.model_copy(
            update={"poll_seconds": 3600})})}
    )  # fmt: skip
    await harness.start()
    await harness.put_desired(harness.resource("cost", "v1\n"))
    await harness.wait_status("cost", "Converged")  # a key the daemon has not seen yet

    counted.clear()
    revision = await harness.put_desired(harness.resource("cost", "v2\n"))  # a key it knows
    await harness.wait_status("cost", "Converged", revision=revision)
    changed = sum(counted.values())

    counted.clear()
    await harness.put_desired(harness.resource("new", "n\n"))
    await harness.wait_status("new", "Converged")
    created = sum(counted.values())

    print(f"\netcd requests per change: changed file {changed} {dict(counted)}, new file {created}")
    assert (harness.root / "cost").read_text() == "v2\n"
    assert changed == 2, counted
    assert created == 2, counted


async def test_a_change_costs_one_reconcile_the_daemons_own_observation_does_not_come_back_as_another(
    harness: Harness,
) -> None:
    """The settle writes actual/; the watch brings that write back, and it must not queue the key again (it
    did, before issue 12: every change cost a second, idle reconcile). One worker takes keys in the order their
    events came, so when the last of three files has converged, every reconcile queued before it has run."""
    reconciler = harness.settings.reconciler.model_copy(update={"workers": 1})
    file = harness.settings.agents.file.model_copy(update={"poll_seconds": 3600})
    harness.settings = harness.settings.model_copy(
        update={"reconciler": reconciler, "agents": harness.settings.agents.model_copy(update={"file": file})}
    )
    await harness.start()
    await harness.put_desired(harness.resource("warm", "w\n"))
    await harness.wait_status("warm", "Converged")
    sample = 'setpoint_reconcile_total{kind="file",result="converged"}'
    before = await eventually(lambda: harness.metric(sample), what="the first reconcile counted")

    for name in ("one", "two", "three"):
        revision = await harness.put_desired(harness.resource(name, f"{name}\n"))
        await harness.wait_status(name, "Converged", revision=revision)

    async def three() -> bool:
        return (await harness.metric(sample) or 0.0) - before >= 3

    await eventually(three, what="three reconciles counted")
    reconciles = (await harness.metric(sample) or 0.0) - before
    print(f"\nreconciles for three changes: {reconciles:g}")
    assert reconciles == 3
