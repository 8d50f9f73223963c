"""Shared fixtures: one real etcd process per test session, on free loopback ports; a 3-member etcd cluster
per test that asks for one (see cluster.py); real Prometheus and Alertmanager servers, and the tools that check
deploy files (see servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import etcd_cluster as etcd_cluster  # a fresh 3-member etcd cluster, for the failover tests
from llm_fakes import llm_server as llm_server  # the fake model APIs, for tests/llm_router and agents
from servers import ALERTMANAGER, PROMETHEUS, PROMTOOL, SYSTEMD_ANALYZE, Servers, require

from reconciler.embedded import EmbeddedEtcd


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    """A real etcd with short heartbeat/election timeouts; tests isolate themselves by key prefix."""
    base: Path = tmp_path_factory.mktemp("etcd")
    server = EmbeddedEtcd(base / "data", fast=True, log_path=base / "etcd.log")
    server.start()
    yield server
    server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the fault tests at their full (long) sizes instead of the CI sizes",
    )


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True when the suite runs with --soak: fault tests use their full sizes."""
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """Starts real Prometheus and Alertmanager servers for this test and stops them after it.

    Skips the test when either is not installed (fails it under SETPOINT_REQUIRE_SERVERS=1).
    """
    require(PROMETHEUS)
    require(ALERTMANAGER)
    started = Servers(tmp_path / "servers")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def promtool() -> str:
    """The path of promtool (Debian package prometheus); skips, or fails under SETPOINT_REQUIRE_SERVERS=1."""
    return require(PROMTOOL)


@pytest.fixture
def systemd_analyze() -> str:
    """The path of systemd-analyze (Debian package systemd); skips, or fails under SETPOINT_REQUIRE_SERVERS=1."""
    return require(SYSTEMD_ANALYZE)
