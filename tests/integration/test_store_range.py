"""EtcdStore.range against a real etcd: pages sized by what they weigh still return every key once, in order, at the
revision of the first page."""

from __future__ import annotations

import uuid

import pytest

from reconciler import store as store_module
from reconciler.embedded import EmbeddedEtcd
from reconciler.store import EtcdStore, range_end


async def test_a_range_read_in_pages_of_changing_size_returns_every_key_once_at_one_revision(
    etcd: EmbeddedEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PAGE_FIRST", 7)
    monkeypatch.setattr(store_module, "PAGE_KEYS", 50)
    monkeypatch.setattr(store_module, "PAGE_BYTES", 4_000)  # pages of small values hold more keys than of large
    prefix = f"/range-{uuid.uuid4().hex[:8]}/"
    names = [f"{prefix}{i:04d}" for i in range(400)]
    async with EtcdStore([etcd.endpoint]) as s:
        for i, name in enumerate(names):
            await s.put(name, b"x" * (400 if 100 <= i < 200 else 3))
        start = prefix.encode()
        kvs, revision = await s.range(start, range_end(start))
        await s.put(names[-1] + "-later", b"after the read")
        again, _ = await s.range(start, range_end(start), revision=revision)
    assert [kv.key.decode() for kv in kvs] == names
    assert [kv.key for kv in again] == [kv.key for kv in kvs], "a range at a revision sees nothing written after it"
    assert all(kv.mod_revision <= revision for kv in kvs)
