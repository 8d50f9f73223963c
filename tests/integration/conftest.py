"""Fixtures that run the real daemon, in-process, against the session's real etcd.

Each test gets its own key prefix and its own allowed root, so tests share
one etcd without seeing each other.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import Harness, make_settings

from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.logs import configure_logging
from reconciler.store import EtcdStore


@pytest.fixture
async def harness(etcd: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[Harness]:
    configure_logging("warning")
    prefix = f"/t-{uuid.uuid4().hex[:10]}"
    root = tmp_path / "root"
    root.mkdir()
    settings = make_settings(etcd, prefix, root)
    async with EtcdStore([etcd.endpoint]) as store:
        h = Harness(store=store, keys=KeySpace(prefix), root=root, settings=settings)
        try:
            yield h
        finally:
            if h._task is not None and not h._task.done():
                with contextlib.suppress(Exception):
                    await h.stop()


@pytest.fixture
async def running(harness: Harness) -> AsyncIterator[Harness]:
    """The harness with the daemon started and ready."""
    await harness.start()
    yield harness
