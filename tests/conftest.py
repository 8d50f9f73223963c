"""Shared fixtures: one real etcd process per test session, on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
