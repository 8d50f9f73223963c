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
