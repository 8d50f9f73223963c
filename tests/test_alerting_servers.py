"""The alerting chain with real servers: an exporter's gauge, a Prometheus rule, Alertmanager, a webhook.

This proves the `servers` fixture (tests/servers.py) works end to end, so a
test of setpoint against Prometheus can rely on it: the gauge flips, the rule
fires, Alertmanager posts a firing notification to a loopback receiver; the
gauge recovers and a resolved notification follows.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from servers import Servers, shipped_rules, wait_for


@dataclass
class Loopback:
    """An aiohttp app on a free loopback port: a /metrics gauge and an Alertmanager webhook receiver."""

    broken: int = 0
    notifications: list[dict[str, Any]] = field(default_factory=list)
    address: str = ""

    async def metrics(self, _: web.Request) -> web.Response:
        body = f'# TYPE smoke_broken gauge\nsmoke_broken{{target="motd"}} {self.broken}\n'
        return web.Response(text=body, content_type="text/plain")

    async def hook(self, request: web.Request) -> web.Response:
        self.notifications.append(await request.json())
        return web.Response(text="ok")

    def notified(self, status: str, alertname: str) -> dict[str, Any] | None:
        """The first notification of `status` (firing, resolved) that holds alert `alertname`, if any."""
        for payload in self.notifications:
            if payload["status"] == status and any(
                a["labels"].get("alertname") == alertname and a["status"] == status for a in payload["alerts"]
            ):
                return payload
        return None


@pytest.fixture
async def loopback() -> AsyncIterator[Loopback]:
    state = Loopback()
    app = web.Application()
    app.router.add_get("/metrics", state.metrics)
    app.router.add_post("/hook", state.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.address = f"{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


RULES = """
groups:
  - name: smoke
    rules:
      - alert: SmokeBroken
        expr: smoke_broken == 1
        labels:
          severity: warning
        annotations:
          summary: "{{ $labels.target }} is broken"
"""


async def test_an_alert_fires_and_resolves_through_real_servers(
    servers: Servers, loopback: Loopback, tmp_path: Path
) -> None:
    rules = tmp_path / "smoke.yaml"
    rules.write_text(RULES)
    am = servers.alertmanager(webhook_url=f"http://{loopback.address}/hook")
    prom = servers.prometheus(jobs={"smoke": [loopback.address]}, rule_files=[rules], alertmanager=am)

    groups = await prom.rules("alert")
    assert [r["name"] for g in groups for r in g["rules"]] == ["SmokeBroken"]
    await prom.wait_query('up{job="smoke"} == 1')
    await prom.wait_query('smoke_broken{job="smoke"} == 0')
    await asyncio.sleep(2)  # a few evaluations with the gauge at 0: nothing fires, nothing is sent
    assert await prom.alerts("SmokeBroken") == []
    assert loopback.notifications == []

    loopback.broken = 1
    (alert,) = await prom.wait_alert("SmokeBroken", state="firing")
    assert alert["labels"]["target"] == "motd"

    async def fired() -> dict[str, Any] | None:
        return loopback.notified("firing", "SmokeBroken")

    payload = await wait_for(fired, timeout=10, what="a firing notification from Alertmanager")
    assert payload["version"] == "4"
    (sent,) = payload["alerts"]
    assert sent["labels"] == {
        "alertname": "SmokeBroken", "instance": loopback.address, "job": "smoke",
        "severity": "warning", "target": "motd",
    }  # fmt: skip
    assert sent["annotations"] == {"summary": "motd is broken"}
    assert [a["labels"]["alertname"] for a in await am.alerts()] == ["SmokeBroken"]

    loopback.broken = 0

    async def resolved() -> dict[str, Any] | None:
        return loopback.notified("resolved", "SmokeBroken")

    payload = await wait_for(resolved, timeout=10, what="a resolved notification from Alertmanager")
    (sent,) = payload["alerts"]
    assert sent["fingerprint"] == loopback.notified("firing", "SmokeBroken")["alerts"][0]["fingerprint"]
    assert await prom.alerts("SmokeBroken") == []


def test_the_servers_stop(servers: Servers, tmp_path: Path) -> None:
    am = servers.alertmanager(webhook_url="http://127.0.0.1:9/unused")
    prom = servers.prometheus(jobs={}, alertmanager=am)
    processes = [prom.process.process, am.process.process]
    servers.close()
    assert all(p is not None and p.poll() is not None for p in processes)


def test_the_shipped_rules_can_be_loaded_with_a_short_hold(tmp_path: Path, promtool: str) -> None:
    path = shipped_rules(tmp_path, hold="1s")
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"SetpointDown", "SetpointResourceNotConverged"}
    assert {r.get("for") for r in rules} == {"1s"}
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
