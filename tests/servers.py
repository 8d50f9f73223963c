"""Real Prometheus and Alertmanager processes for tests, and the tools that check deploy files.

The binaries come from Debian's `prometheus`, `prometheus-alertmanager` and
`systemd` packages, which `make test` installs where it runs as root on
Debian. Where one is missing, a test that needs it is skipped with a reason
that names the package, unless `SETPOINT_REQUIRE_SERVERS=1` (set by
`.ci/run`), where it fails instead: in CI a missing server is a failure.

Each server runs on a free loopback port with its data in a temporary
directory and timings fast enough for tests (scrape and rule evaluation
every second, Alertmanager grouping in about a second). Starting blocks
until the server answers `/-/ready`; stopping sends SIGTERM, then SIGKILL,
and a server whose test process dies is sent SIGTERM by the kernel
(PR_SET_PDEATHSIG), so none outlives the run.

Importing this module needs neither server installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from reconciler.embedded import spawn_child

REQUIRE_SERVERS_ENV = "SETPOINT_REQUIRE_SERVERS"
ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"


@dataclass(frozen=True)
class Binary:
    """An executable a test needs: the names to look for on PATH, and the Debian package that has it."""

    names: tuple[str, ...]
    package: str


PROMETHEUS = Binary(("prometheus",), "prometheus")
PROMTOOL = Binary(("promtool",), "prometheus")
ALERTMANAGER = Binary(("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager")
SYSTEMD_ANALYZE = Binary(("systemd-analyze",), "systemd")
SYSTEMD_SYSUSERS = Binary(("systemd-sysusers",), "systemd")


def require(binary: Binary) -> str:
    """The path of `binary`; skips the test when it is missing, or fails it under SETPOINT_REQUIRE_SERVERS=1."""
    for name in binary.names:
        path = shutil.which(name)
        if path:
            return path
    reason = (
        f"{' or '.join(binary.names)} not found on PATH: install the Debian package {binary.package} "
        "(make test does, as root on Debian)"
    )
    if os.environ.get(REQUIRE_SERVERS_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_SERVERS_ENV}=1 makes a missing server a failure", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the server retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 15.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `check` until it returns something truthy and return it; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        last = await check()
        if last:
            return last
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or check}; last value {last!r}")
        await asyncio.sleep(interval)


class ServerStartError(Exception):
    """A server exited or did not become ready; the message ends with the tail of its log."""


@dataclass
class ServerProcess:
    """One server process: its log file, its start (until `/-/ready` answers 200) and its stop."""

    name: str
    argv: list[str]
    url: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, timeout: float = 20.0) -> None:
        with self.log_path.open("ab") as log:
            # In a session of its own (a Ctrl-C in the terminal reaches pytest, which stops it in order), and
            # sent SIGTERM by the kernel if pytest dies.
            self.process = spawn_child(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerStartError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"{self.name} was not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @property
    def port_taken(self) -> bool:
        return "address already in use" in self.log_tail(lines=200)


def _launch(*, name: str, directory: Path, argv_for: Callable[[int], list[str]], attempts: int = 3) -> ServerProcess:
    """Start a server on a free port, again on another port if something took the first one meanwhile."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        server = ServerProcess(
            name=name, argv=argv_for(port), url=f"http://127.0.0.1:{port}", log_path=directory / f"{name}.log"
        )
        try:
            server.start()
        except ServerStartError:
            if attempt < attempts and server.port_taken:
                continue
            raise
        return server
    raise AssertionError("unreachable")


async def _get_json(url: str, params: Mapping[str, str] | None = None) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url, params=params) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            raise AssertionError(f"GET {resp.url} answered {resp.status}: {body!r}")
        return body


@dataclass
class Alertmanager:
    process: ServerProcess
    config_path: Path

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def address(self) -> str:
        """host:port, for Prometheus' `alerting.alertmanagers` targets."""
        return self.url.removeprefix("http://")

    async def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds (`GET /api/v2/alerts`)."""
        result: list[dict[str, Any]] = await _get_json(f"{self.url}/api/v2/alerts")
        return result


@dataclass
class Prometheus:
    process: ServerProcess
    config_path: Path

    @property
    def url(self) -> str:
        return self.process.url

    async def api(self, path: str, **params: str) -> Any:
        """`GET /api/v1/<path>`; the `data` of a `success` answer, else the test fails with the error."""
        body = await _get_json(f"{self.url}/api/v1/{path}", params)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus /api/v1/{path} failed: {body!r}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: a list of `{"metric": {...}, "value": [t, "v"]}`."""
        data = await self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} is a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float | None:
        """The value of an instant query that has at most one sample (None: no sample)."""
        result = await self.query(expr)
        if len(result) > 1:
            raise AssertionError(f"{expr!r} has {len(result)} samples: {result!r}")
        return float(result[0]["value"][1]) if result else None

    async def alerts(self, name: str | None = None, *, state: str | None = None) -> list[dict[str, Any]]:
        """Active alerts (`/api/v1/alerts`), optionally only those named `name` and in `state`
        (`pending` or `firing`)."""
        data = await self.api("alerts")
        return [
            a
            for a in data["alerts"]
            if (name is None or a["labels"].get("alertname") == name) and (state is None or a["state"] == state)
        ]

    async def rules(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The loaded rule groups (`/api/v1/rules`); `kind` is `alert` or `record` to filter."""
        data = await (self.api("rules", type=kind) if kind else self.api("rules"))
        groups: list[dict[str, Any]] = data["groups"]
        return groups

    async def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (`/api/v1/targets`)."""
        data = await self.api("targets", state="active")
        targets: list[dict[str, Any]] = data["activeTargets"]
        return targets

    async def wait_query(self, expr: str, *, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until `expr` returns a non-empty vector; return it."""

        async def check() -> list[dict[str, Any]]:
            return await self.query(expr)

        result: list[dict[str, Any]] = await wait_for(check, timeout=timeout, what=f"a sample of {expr!r}")
        return result

    async def wait_alert(self, name: str, *, state: str = "firing", timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until alert `name` is in `state`; return those alerts."""

        async def check() -> list[dict[str, Any]]:
            return await self.alerts(name, state=state)

        result: list[dict[str, Any]] = await wait_for(check, timeout=timeout, what=f"alert {name} {state}")
        return result


class Servers:
    """Starts servers for one test and stops them all, last started first, at `close()`.

    Timings (defaults): Prometheus scrapes and evaluates rules every 1 s and
    resends firing alerts every 1 s; Alertmanager waits 1 s before a group's
    first notification and 1 s between a group's notifications (so a resolved
    alert is announced about a second after Prometheus says so), and sends
    resolved notifications. Prometheus 2.42 hands new targets to its scrapers
    at most every 5 s, so the first scrape comes about 5 s after the start:
    wait for it with `wait_query('up{job="..."} == 1')`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[ServerProcess] = []

    def _dir(self, name: str) -> Path:
        path = self.directory / f"{name}-{len(self._started)}"
        path.mkdir(parents=True)
        return path

    def alertmanager(
        self,
        *,
        webhook_url: str,
        group_by: Sequence[str] = ("alertname",),
        group_wait: str = "1s",
        group_interval: str = "1s",
        repeat_interval: str = "1h",
        credentials_file: Path | None = None,
    ) -> Alertmanager:
        """An Alertmanager that sends every alert, firing and resolved, to `webhook_url` (webhook v4 payloads);
        with `credentials_file`, as `Authorization: Bearer <its content>`."""
        binary = require(ALERTMANAGER)
        base = self._dir("alertmanager")
        config: dict[str, Any] = {
            "route": {
                "receiver": "test",
                "group_by": list(group_by),
                "group_wait": group_wait,
                "group_interval": group_interval,
                "repeat_interval": repeat_interval,
            },
            "receivers": [{"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
        }
        if credentials_file is not None:
            hook = config["receivers"][0]["webhook_configs"][0]
            hook["http_config"] = {"authorization": {"type": "Bearer", "credentials_file": str(credentials_file)}}
        config_path = base / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(config))

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={config_path}",
                f"--storage.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # empty: no clustering, no gossip port
                "--log.level=info",
            ]

        process = _launch(name="alertmanager", directory=base, argv_for=argv)
        self._started.append(process)
        return Alertmanager(process=process, config_path=config_path)

    def prometheus(
        self,
        *,
        jobs: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        alertmanager: Alertmanager | None = None,
        interval: str = "1s",
    ) -> Prometheus:
        """A Prometheus scraping each job's targets (`host:port`, path /metrics) and evaluating `rule_files`,
        sending its alerts to `alertmanager`."""
        binary = require(PROMETHEUS)
        base = self._dir("prometheus")
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]} for job, targets in jobs.items()
            ],
        }
        if alertmanager is not None:
            config["alerting"] = {
                "alertmanagers": [{"api_version": "v2", "static_configs": [{"targets": [alertmanager.address]}]}]
            }
        config_path = base / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--rules.alert.resend-delay=1s",
                "--log.level=info",
            ]

        process = _launch(name="prometheus", directory=base, argv_for=argv)
        self._started.append(process)
        return Prometheus(process=process, config_path=config_path)

    def close(self) -> None:
        while self._started:
            with contextlib.suppress(Exception):
                self._started.pop().stop()


def shipped_rules(directory: Path, *, hold: str | None = None) -> Path:
    """A copy of deploy/prometheus/alerts.yaml in `directory`; with `hold`, every rule's `for:` is set to it
    (for example "1s"), so a test can see an alert fire without waiting its real threshold."""
    rules = yaml.safe_load(SHIPPED_RULES.read_text())
    if hold is not None:
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = hold
    path = directory / "setpoint-alerts.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path
