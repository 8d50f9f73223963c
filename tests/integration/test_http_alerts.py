"""`POST /v1/alerts` against the real etcd: Alertmanager's payload in, issues out, nothing half-written."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from harness import sample_value

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd
from reconciler.http import AlertApi, HttpServer
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.store import EtcdStore

TOKEN = b"alert-token"


def alert(
    status: str = "firing", *, name: str = "motd", fingerprint: str = "3f2a9c0d1e4b5a67", **labels: str
) -> dict[str, Any]:
    """One alert as Alertmanager 0.25 sends it in a version 4 webhook payload."""
    return {
        "status": status,
        "labels": {"alertname": "FileBroken", "setpoint_kind": "file", "setpoint_name": name, "severity": "critical",
                   **labels},
        "annotations": {"summary": f"{name} is broken", "description": "the exporter says so"},
        "startsAt": "2026-11-22T10:00:00.000Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-11-22T10:05:00.000Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=broken",
        "fingerprint": fingerprint,
    }  # fmt: skip


def payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    return {
        "receiver": "setpoint", "status": status, "alerts": list(alerts), "groupLabels": {"alertname": "FileBroken"},
        "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "version": "4",
        "groupKey": '{}:{alertname="FileBroken"}', "truncatedAlerts": 0,
    }  # fmt: skip


@dataclass
class Endpoint:
    store: EtcdStore
    keys: KeySpace
    metrics: Metrics
    url: str
    session: aiohttp.ClientSession

    async def post(self, body: Any = None, *, data: bytes | None = None, token: bytes | None = None) -> tuple[int, Any]:
        raw = data if data is not None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token.decode()}"} if token is not None else {}
        async with self.session.post(self.url, data=raw, headers=headers) as resp:
            return resp.status, json.loads(await resp.text())

    async def issues(self) -> dict[str, dict[str, Any]]:
        """The issues in etcd, by `kind/name/id`."""
        prefix = self.keys.section(Section.ISSUES)
        kvs, _ = await self.store.get_prefix(prefix)
        return {kv.key.decode()[len(prefix) :]: json.loads(kv.value) for kv in kvs}

    def count(self, result: str) -> float | None:
        return sample_value(self.metrics.registry, f'setpoint_alerts_received_total{{result="{result}"}}')


async def _endpoint(etcd: EmbeddedEtcd, token: bytes | None) -> AsyncIterator[Endpoint]:
    keys = KeySpace(f"/t-{uuid.uuid4().hex[:10]}")
    metrics = Metrics()
    async with EtcdStore([etcd.endpoint]) as store:
        server = HttpServer(
            listen="127.0.0.1:0", metrics=metrics, ready=lambda: "leader",
            alerts=AlertApi(token=token, keys=keys, store=lambda: store),
        )  # fmt: skip
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                yield Endpoint(store, keys, metrics, f"http://127.0.0.1:{server.port}/v1/alerts", session)
        finally:
            await server.stop()


@pytest.fixture
async def endpoint(etcd: EmbeddedEtcd) -> AsyncIterator[Endpoint]:
    async for found in _endpoint(etcd, None):
        yield found


@pytest.fixture
async def guarded(etcd: EmbeddedEtcd) -> AsyncIterator[Endpoint]:
    async for found in _endpoint(etcd, TOKEN):
        yield found


async def test_a_firing_alert_becomes_an_issue_and_its_resolution_removes_it(endpoint: Endpoint) -> None:
    unlabelled = alert(fingerprint="00000000000000aa")
    del unlabelled["labels"]["setpoint_kind"]
    status, body = await endpoint.post(payload(alert(), unlabelled))
    assert status == 200
    assert body == {"reported": 1, "resolved": 0, "unchanged": 0, "ignored": 1, "invalid": 0}

    issues = await endpoint.issues()
    key = endpoint.keys.issue(ResourceKey(kind="file", name="motd"), "3f2a9c0d1e4b5a67")
    assert await endpoint.store.get(key) is not None
    (issue,) = issues.values()
    assert issue["summary"] == "motd is broken"
    assert issue["severity"] == "critical"
    assert issue["source"] == "alertmanager/FileBroken"
    assert issue["details"]["labels"]["setpoint_name"] == "motd"
    assert issue["details"]["starts_at"] == "2026-11-22T10:00:00.000Z"

    # Alertmanager repeats a firing alert: the same report, not written again.
    first = await endpoint.store.get(key)
    status, body = await endpoint.post(payload(alert()))
    assert (status, body["unchanged"], body["reported"]) == (200, 1, 0)
    again = await endpoint.store.get(key)
    assert first is not None and again is not None and again.mod_revision == first.mod_revision

    status, body = await endpoint.post(payload(alert("resolved"), status="resolved"))
    assert (status, body["resolved"]) == (200, 1)
    assert await endpoint.issues() == {}
    assert endpoint.count("reported") == 1 and endpoint.count("resolved") == 1 and endpoint.count("ignored") == 1


@pytest.mark.parametrize(
    ("label", "expected"), [("critical", "critical"), ("page", "critical"), ("info", "info"), ("warning", "warning"),
                            ("P3", "warning")],
)  # fmt: skip
async def test_the_severity_label_maps_to_an_issue_severity(endpoint: Endpoint, label: str, expected: str) -> None:
    assert (await endpoint.post(payload(alert(severity=label))))[0] == 200
    (issue,) = (await endpoint.issues()).values()
    assert issue["severity"] == expected


async def test_labels_that_are_not_valid_names_are_counted_and_skipped(endpoint: Endpoint) -> None:
    status, body = await endpoint.post(payload(alert(name="Not/A name"), alert(name="fine", fingerprint="0123")))
    assert (status, body["invalid"], body["reported"]) == (200, 1, 1)
    assert list(await endpoint.issues()) == ["file/fine/0123"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "the request body is not valid JSON"),
        (b"[]", "the request body must be a JSON object (Alertmanager's webhook payload)"),
        (json.dumps({**payload(alert()), "version": "3"}).encode(), 'unsupported payload version "3"'),
        (json.dumps({**payload(alert()), "version": 4}).encode(),
         'unsupported payload version 4: setpoint takes Alertmanager\'s webhook payload, "version": "4"'),
        (json.dumps({"version": "4"}).encode(), "the payload has no 'alerts' list"),
        (json.dumps(payload(alert(), alert("pending"))).encode(), "alerts[1].status must be 'firing' or 'resolved'"),
        (json.dumps(payload(alert(), {**alert(), "labels": {"a": 1}})).encode(),
         "alerts[1].labels must be an object of strings"),
    ],
)  # fmt: skip
async def test_a_malformed_payload_is_refused_whole(endpoint: Endpoint, body: bytes, reason: str) -> None:
    status, answer = await endpoint.post(data=body)
    assert status == 400
    assert answer["error"].startswith(reason)
    assert await endpoint.issues() == {}, "not even the valid alert before the bad one is written"


async def test_the_body_is_capped(endpoint: Endpoint) -> None:
    status, answer = await endpoint.post(data=b" " * (1024 * 1024 + 1))
    assert status == 413 and "1 MiB" in answer["error"]


async def test_a_configured_token_is_required(guarded: Endpoint) -> None:
    status, answer = await guarded.post(payload(alert()))
    assert status == 401 and "Authorization" in answer["error"]
    status, _ = await guarded.post(payload(alert()), token=b"wrong")
    assert status == 401
    assert await guarded.issues() == {}
    status, body = await guarded.post(payload(alert()), token=TOKEN)
    assert (status, body["reported"]) == (200, 1)


async def test_a_firing_is_one_report_whatever_its_annotations_say_meanwhile(endpoint: Endpoint) -> None:
    first = alert()
    assert (await endpoint.post(payload(first)))[1]["reported"] == 1
    later = alert()
    later["annotations"]["summary"] = "motd is broken (value 3)"
    assert (await endpoint.post(payload(later)))[1]["unchanged"] == 1
    (issue,) = (await endpoint.issues()).values()
    assert issue["summary"] == "motd is broken"

    # Resolved, then firing again: a new firing, a new report.
    await endpoint.post(payload(alert("resolved")))
    refired = alert()
    refired["startsAt"] = "2026-11-22T11:00:00.000Z"
    assert (await endpoint.post(payload(refired)))[1]["reported"] == 1
    # A late resolved notification of the first firing does not close the second.
    assert (await endpoint.post(payload(alert("resolved"))))[1]["unchanged"] == 1
    assert len(await endpoint.issues()) == 1


def _big(fingerprint: str) -> dict[str, Any]:
    """An alert whose annotations are as large as setpoint keeps them, in characters JSON escapes to 12 bytes."""
    big = alert(fingerprint=fingerprint, name=f"big-{fingerprint[-4:]}")
    big["annotations"] = {f"a{n:02d}": "\U0001f600" * 1024 for n in range(64)}
    return big


async def test_large_alerts_are_recorded_whole_in_requests_etcd_takes(endpoint: Endpoint) -> None:
    small = [alert(fingerprint=f"{n:016x}", name=f"f{n}") for n in range(128)]
    large = [_big(f"ffff{n:012x}") for n in range(3)]
    raw = json.dumps(payload(*small, *large), ensure_ascii=False).encode()
    assert len(raw) < 1024 * 1024

    status, body = await endpoint.post(data=raw)

    assert (status, body["reported"]) == (200, 131), body
    issues = await endpoint.issues()
    assert len(issues) == 131
    cut = [issue for issue in issues.values() if issue["details"].get("details_cut")]
    assert len(cut) == 3 and all("annotations" not in issue["details"] for issue in cut)


async def test_two_deliveries_of_one_firing_at_once_make_one_report(endpoint: Endpoint) -> None:
    # Alertmanager in a cluster sends a notification from each member; the summaries differ by a $value.
    first, second = alert(), alert()
    second["annotations"]["summary"] = "motd is broken (value 2)"
    results = await asyncio.gather(*(endpoint.post(payload(a)) for a in (first, second) for _ in range(3)))

    assert all(status == 200 for status, _ in results)
    assert sum(body["reported"] for _, body in results) == 1
    kv = await endpoint.store.get(endpoint.keys.issue(ResourceKey(kind="file", name="motd"), "3f2a9c0d1e4b5a67"))
    assert kv is not None and kv.version == 1, "written once"
