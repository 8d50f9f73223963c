"""http_check in the running daemon, against a real HTTP server on loopback and a real etcd.

The target is a `file` resource: its agent has no rule for a failed check, so each report ends `unhealable`,
which is a report dealt with, exactly what makes a check that still fails report again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from endpoint import Endpoint
from harness import Harness, eventually
from injection import fail_writes

from plans import NAME_PATTERN, ResourceKey
from reconciler.probes import issue_id
from reconciler.settings import HttpCheckAgentSettings

INTERVAL = 0.1
ISSUE_ID = "http_check.web"


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    server = await Endpoint().start()
    yield server
    await server.stop()


def fast_checks(h: Harness) -> None:
    agents = h.settings.agents.model_copy(update={"http_check": HttpCheckAgentSettings(min_interval_seconds=0.05)})
    h.settings = h.settings.model_copy(update={"agents": agents})


@pytest.fixture
async def daemon(harness: Harness) -> AsyncIterator[Harness]:
    fast_checks(harness)
    await harness.start()
    yield harness


def check(endpoint: Endpoint, *, target: str = "file/site", name: str = "web", **spec: Any) -> dict[str, Any]:
    spec = {"url": endpoint.url, "target": target, "interval_seconds": INTERVAL, "failure_threshold": 3, **spec}
    return {"kind": "http_check", "name": name, "spec": spec}


async def get_json(h: Harness, key: str) -> dict[str, Any] | None:
    kv = await h.store.get(key)
    return json.loads(kv.value) if kv is not None else None


async def issue(h: Harness, target: str = "site", issue_id: str = ISSUE_ID) -> dict[str, Any] | None:
    return await get_json(h, h.keys.issue(ResourceKey(kind="file", name=target), issue_id))


async def actual(h: Harness, name: str = "web") -> dict[str, Any] | None:
    observed = await get_json(h, h.keys.actual(ResourceKey(kind="http_check", name=name)))
    return observed["state"] if observed is not None else None


async def actual_version(h: Harness, name: str = "web") -> int:
    kv = await h.store.get(h.keys.actual(ResourceKey(kind="http_check", name=name)))
    assert kv is not None
    return kv.version


async def a_site(h: Harness, name: str = "site") -> None:
    await h.put_desired(h.resource(name, "hello\n"))
    await h.wait_status(name, "Converged")


async def passing(h: Harness, name: str = "web") -> bool:
    state = await actual(h, name)
    return state is not None and state["passing"] is True


async def test_failures_past_the_threshold_report_an_issue_on_the_target_withdrawn_when_it_passes(
    daemon: Harness, endpoint: Endpoint
) -> None:
    h = daemon
    await a_site(h)
    await h.put_desired(check(endpoint))
    await eventually(lambda: passing(h), what="the check to pass")
    status = await eventually(lambda: h.status("web", kind="http_check"), what="the check's status")
    assert status["phase"] == "Converged"
    assert status["message"].startswith(f"probes GET {endpoint.url} every 0.1 s; 3 failures in a row report an issue")

    endpoint.answer(500)
    reported = await eventually(lambda: issue(h), what="the issue on file/site")
    details = reported.pop("details")
    assert reported == {
        "summary": f"GET {endpoint.url} returned 500 (3 failures in a row)",
        "severity": "warning",
        "source": "http_check/web",
    }
    began = details.pop("reported_at")
    assert details == {
        "url": endpoint.url, "method": "GET", "status": 500, "error": "returned 500", "check": "http_check/web",
        "failures": 3, "failing_since": began,
    }  # fmt: skip
    assert datetime.fromisoformat(began).tzinfo is not None
    listed = await h.wait_issue("site", ISSUE_ID, "unhealable")  # a file's agent has no rule for it
    assert listed["source"] == "http_check/web"
    state = await actual(h)
    assert state is not None
    assert {k: state[k] for k in ("passing", "consecutive_failures", "last_status", "target", "target_desired")} == {
        "passing": False, "consecutive_failures": 3, "last_status": 500, "target": "file/site", "target_desired": True,
    }  # fmt: skip

    endpoint.answer(200)

    async def withdrawn() -> bool:
        return await issue(h) is None and await passing(h)

    await eventually(withdrawn, what="the issue to be withdrawn once the check passes")
    await eventually(lambda: _listed_none(h), what="the issue to leave file/site's status")
    state = await actual(h)
    assert state is not None and state["consecutive_failures"] == 0 and state["failing_since"] is None


async def _listed_none(h: Harness) -> bool:
    return await h.issue_states("site") == {}


async def test_a_hang_past_the_timeout_counts_as_a_failure(daemon: Harness, endpoint: Endpoint) -> None:
    h = daemon
    await a_site(h)
    endpoint.hang()
    await h.put_desired(check(endpoint, timeout_seconds=0.2))
    reported = await eventually(lambda: issue(h), what="the issue a hung endpoint raises")
    assert reported["summary"] == f"GET {endpoint.url} timed out after 0.2 s (3 failures in a row)"
    assert reported["details"]["status"] is None and reported["details"]["error"] == "timed out after 0.2 s"
    endpoint.answer(200)
    await eventually(lambda: _gone(h), what="the issue to be withdrawn once the endpoint answers")


async def _gone(h: Harness) -> bool:
    return await issue(h) is None


async def test_a_check_that_still_fails_after_its_report_was_dealt_with_reports_again_less_and_less_often(
    daemon: Harness, endpoint: Endpoint
) -> None:
    h = daemon
    await a_site(h)
    endpoint.answer(503)
    await h.put_desired(check(endpoint))
    first = await eventually(lambda: issue(h), what="the first report")
    first_listed = await h.wait_issue("site", ISSUE_ID, "unhealable")

    async def report_after(previous: dict[str, Any]) -> dict[str, Any] | None:
        current = await issue(h)
        return current if current is not None and current != previous else None

    second = await eventually(lambda: report_after(first), what="a new report once the first was dealt with")
    assert second["details"]["failing_since"] == first["details"]["failing_since"], "the same run of failures"
    assert second["details"]["reported_at"] > first["details"]["reported_at"], "counted after the first was done"
    assert second["details"]["failures"] >= first["details"]["failures"] + 3
    assert second["summary"] == f"GET {endpoint.url} returned 503 ({second['details']['failures']} failures in a row)"

    async def new_report_listed() -> dict[str, Any] | None:
        listed = (await h.issue_states("site")).get(ISSUE_ID)
        ok = listed is not None and listed["report"] != first_listed["report"] and listed["state"] == "unhealable"
        return listed if ok else None

    await eventually(new_report_listed, what="the new report to be looked at afresh")
    third = await eventually(lambda: report_after(second), what="a third report")
    # Each renewal in one run of failures waits twice as many probes as the one before.
    assert third["details"]["failures"] >= second["details"]["failures"] + 6


async def test_actual_is_written_when_the_outcome_changes_not_on_every_probe(
    daemon: Harness, endpoint: Endpoint
) -> None:
    h = daemon
    await a_site(h)
    await h.put_desired(check(endpoint))
    await eventually(lambda: passing(h), what="the check to pass")
    seen = endpoint.requests

    async def probed(count: int) -> bool:
        return endpoint.requests >= count

    await eventually(lambda: probed(seen + 10), what="ten more probes")
    assert await actual_version(h) == 1, "ten passing probes, one write"

    endpoint.answer(500)
    await eventually(lambda: issue(h), what="the issue")
    failing_from = endpoint.requests
    await eventually(lambda: probed(failing_from + 10), what="ten more failing probes")
    # Failures 1, 2 and 3 change what it says (counted up to the threshold); after that nothing does.
    assert await actual_version(h) == 4

    endpoint.answer(200)
    await eventually(lambda: passing(h), what="the check to pass again")
    assert await actual_version(h) == 5


async def test_deleting_the_check_stops_probing_and_withdraws_what_it_wrote(
    daemon: Harness, endpoint: Endpoint
) -> None:
    h = daemon
    await a_site(h)
    endpoint.answer(500)
    await h.put_desired(check(endpoint))
    await eventually(lambda: issue(h), what="the issue")
    await h.store.delete(h.keys.desired(ResourceKey(kind="http_check", name="web")))

    async def cleared() -> bool:
        return await issue(h) is None and await actual(h) is None and await h.status("web", kind="http_check") is None

    await eventually(cleared, what="the issue, the observation and the status of the deleted check to go")
    stopped_at = endpoint.requests
    await asyncio.sleep(10 * INTERVAL)
    assert endpoint.requests == stopped_at, "a deleted check is not probed"


async def test_a_target_that_is_not_desired_is_reported_nothing_until_it_is(
    daemon: Harness, endpoint: Endpoint
) -> None:
    h = daemon
    endpoint.answer(500)
    await h.put_desired(check(endpoint))

    async def counted() -> dict[str, Any] | None:
        state = await actual(h)
        return state if state is not None and state["consecutive_failures"] == 3 else None

    state = await eventually(counted, what="three failures to be counted")
    assert state["target_desired"] is False
    past = endpoint.requests + 3
    await eventually(lambda: _probed(endpoint, past), what="more failing probes")
    assert await issue(h) is None

    await h.put_desired(h.resource("site", "hello\n"))
    await eventually(lambda: issue(h), what="the issue once the target is desired")


async def _probed(endpoint: Endpoint, count: int) -> bool:
    return endpoint.requests >= count


async def test_a_check_that_changes_target_moves_its_issue(daemon: Harness, endpoint: Endpoint) -> None:
    h = daemon
    await a_site(h, "old")
    await a_site(h, "new")
    endpoint.answer(500)
    await h.put_desired(check(endpoint, target="file/old"))
    await eventually(lambda: issue(h, "old"), what="the issue on file/old")
    await h.put_desired(check(endpoint, target="file/new"))

    async def moved() -> bool:
        return await issue(h, "old") is None and await issue(h, "new") is not None

    await eventually(moved, what="the issue to move to file/new")


async def test_an_invalid_check_is_invalid_and_probes_nothing(daemon: Harness, endpoint: Endpoint) -> None:
    h = daemon
    await h.put_desired(check(endpoint, method="POST"))

    async def invalid() -> dict[str, Any] | None:
        status = await h.status("web", kind="http_check")
        return status if status is not None and status["phase"] == "Invalid" else None

    status = await eventually(invalid, what="the check to be Invalid")
    assert status["message"] == "spec.method must be GET or HEAD (a probe must not change anything)"
    assert endpoint.requests == 0


async def test_the_issue_of_a_check_deleted_while_the_daemon_was_down_is_withdrawn_at_start(
    harness: Harness, endpoint: Endpoint
) -> None:
    h = harness
    fast_checks(h)
    await h.start()
    await a_site(h)
    endpoint.answer(500)
    await h.put_desired(check(endpoint))
    await eventually(lambda: issue(h), what="the issue")
    assert await h.stop() == 0
    await h.store.delete(h.keys.desired(ResourceKey(kind="http_check", name="web")))
    assert await issue(h) is not None

    await h.start()

    async def cleared() -> bool:
        return await issue(h) is None and await actual(h) is None

    await eventually(cleared, what="the issue and observation of the check deleted meanwhile to go")


@pytest.mark.parametrize("applied", [False, True], ids=["refused", "applied-answer-lost"])
async def test_etcd_failing_a_report_costs_that_write_only(
    daemon: Harness, endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    h = daemon
    await a_site(h)
    issue_key = h.keys.issue(ResourceKey(kind="file", name="site"), ISSUE_ID)
    faults = fail_writes(monkeypatch, lambda key, value: key == issue_key, times=1 if applied else 2, applied=applied)
    endpoint.answer(500)
    await h.put_desired(check(endpoint))
    reported = await eventually(lambda: issue(h), what="the issue, once etcd takes it")
    if applied:  # the first write went in: it is the report, and it is not written again on top of itself
        assert reported["details"]["failures"] == 3
        assert faults.failed == [issue_key]
    else:
        assert reported["details"]["failures"] == 5, "written by the first probe past the threshold etcd took"
        assert faults.failed == [issue_key, issue_key]
    endpoint.answer(200)
    await eventually(lambda: _gone(h), what="the check, still probing, to withdraw it")


def test_the_issue_id_fits_the_name_pattern_however_long_the_check_name() -> None:
    assert issue_id(ResourceKey(kind="http_check", name="web")) == "http_check.web"
    long_names = ["a" * 63, "a" * 52 + "b", "a" * 52 + "c"]
    ids = [issue_id(ResourceKey(kind="http_check", name=name)) for name in long_names]
    assert all(NAME_PATTERN.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == 3, "names that share a prefix keep apart"
