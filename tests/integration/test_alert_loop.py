"""The loop closed with real servers: Prometheus alerts, Alertmanager delivers, setpoint heals; and the shipped
alert rules evaluated by a real Prometheus on setpoint's own /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from harness import Harness, eventually
from servers import Servers, shipped_rules
from test_issues import slow_poll

from reconciler.settings import AlertSettings

RULES = """
groups:
  - name: managed-files
    rules:
      - alert: MotdWrong
        expr: e2e_file_ok == 0
        labels:
          severity: critical
          setpoint_kind: file
          setpoint_name: "{{ $labels.name }}"
        annotations:
          summary: "{{ $labels.name }} does not have the expected content"
"""


class FileExporter:
    """A probe that checks one file at every scrape: `e2e_file_ok{name=...}` is 1 when it holds `expected`."""

    def __init__(self, path: Path, expected: str) -> None:
        self.path = path
        self.expected = expected
        self.address = ""

    async def metrics(self, _: web.Request) -> web.Response:
        try:
            ok = self.path.read_text() == self.expected
        except OSError:
            ok = False
        body = f'# TYPE e2e_file_ok gauge\ne2e_file_ok{{name="{self.path.name}"}} {int(ok)}\n'
        return web.Response(text=body, content_type="text/plain")


@pytest.fixture
async def exporter(harness: Harness) -> AsyncIterator[FileExporter]:
    probe = FileExporter(harness.root / "motd", "hello\n")
    app = web.Application()
    app.router.add_get("/metrics", probe.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    probe.address = f"{host}:{port}"
    try:
        yield probe
    finally:
        await runner.cleanup()


async def test_an_alert_about_a_file_gets_it_healed_and_the_issue_closed(
    harness: Harness, exporter: FileExporter, servers: Servers, tmp_path: Path
) -> None:
    slow_poll(harness)  # an hour: only the alert can make the daemon look at the file again
    token = tmp_path / "alerts-token"
    token.write_text("e2e-secret\n")
    harness.settings = harness.settings.model_copy(update={"alerts": AlertSettings(token_file=str(token))})
    daemon = await harness.start()
    await harness.put_desired(harness.resource("motd", "hello\n"))
    await harness.wait_status("motd", "Converged")

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    alertmanager = servers.alertmanager(
        webhook_url=f"http://127.0.0.1:{daemon.http_port}/v1/alerts", credentials_file=token
    )
    prometheus = servers.prometheus(jobs={"probe": [exporter.address]}, rule_files=[rules], alertmanager=alertmanager)
    await prometheus.wait_query('up{job="probe"} == 1', timeout=20)
    assert await prometheus.value("e2e_file_ok") == 1.0

    (harness.root / "motd").write_text("tampered\n")

    async def healed() -> dict[str, object] | None:
        states = await harness.issue_states("motd")
        return next((issue for issue in states.values() if issue["state"] == "healed"), None)

    issue = await eventually(healed, timeout=40, what="the alert to reach setpoint and the file to be healed")
    assert (harness.root / "motd").read_text() == "hello\n"
    assert issue["source"] == "alertmanager/MotdWrong" and issue["severity"] == "critical"
    assert issue["summary"] == "motd does not have the expected content"
    record = await harness.plan_record(str(issue["plan_id"]))
    assert record["state"] == "succeeded" and record["answers"][0]["id"] == issue["id"]

    # The probe sees the file right again, the alert resolves, Alertmanager says so, and the issue is gone.
    async def closed() -> bool:
        kvs, _ = await harness.store.get_prefix(harness.keys.issues(harness.daemon_key("motd")))
        return not kvs and await harness.issue_states("motd") == {}

    await eventually(closed, timeout=40, what="the resolved alert to close the issue")
    assert await harness.metric('setpoint_alerts_received_total{result="reported"}') == 1.0
    assert await harness.metric('setpoint_alerts_received_total{result="resolved"}') == 1.0
    assert await harness.metric('setpoint_heals_total{result="healed"}') == 1.0
    status = await harness.status("motd")
    assert status is not None and status["phase"] == "Converged"


async def test_the_shipped_rules_fire_on_setpoint_own_metrics(
    harness: Harness, servers: Servers, tmp_path: Path
) -> None:
    harness.use_policies({"rules": [{"name": "frozen", "match": {"name": "frozen*"}, "action": "deny"}]})
    daemon = await harness.start()
    await harness.put_desired(harness.resource("frozen-motd", "x\n"))
    await harness.put_desired(harness.resource("fine", "y\n"))
    await harness.wait_status("frozen-motd", "Blocked")
    await harness.wait_status("fine", "Converged")

    prometheus = servers.prometheus(
        jobs={"setpoint": [f"127.0.0.1:{daemon.http_port}"]}, rule_files=[shipped_rules(tmp_path, hold="1s")]
    )
    await prometheus.wait_query('up{job="setpoint"} == 1', timeout=20)
    firing = await prometheus.wait_alert("SetpointResourceNotConverged", timeout=20)
    assert {alert["labels"].get("kind") for alert in firing} == {"file"}
    assert [alert["labels"].get("phase") for alert in firing] == ["Blocked"]
    # A healthy daemon trips nothing else the shipped rules watch.
    alerts = {alert["labels"]["alertname"] for alert in await prometheus.alerts()}
    assert alerts == {"SetpointResourceNotConverged"}, alerts
