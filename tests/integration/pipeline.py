"""The daemon's reconcile pipeline, wired by `assembly.build`, on a real etcd and a cache the test drives.

Filling the cache by hand is exactly a watch that is behind etcd, or one that
has delivered a change: the tests choose which, event by event.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import write_policies

from plans import Resource, ResourceKey
from reconciler.assembly import Assembly, Runtime, assemble, build
from reconciler.cache import Cache, DesiredEntry
from reconciler.clock import SystemClock
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.settings import Settings
from reconciler.store import EtcdStore


@dataclass
class Pipeline:
    runtime: Runtime
    store: EtcdStore
    keys: KeySpace
    cache: Cache
    root: Path

    def file(self, name: str, content: str) -> Resource:
        return Resource(kind="file", name=name, spec={"path": str(self.root / name), "content": content})

    async def put(self, resource: Resource, *, cached: bool = True) -> int:
        """Write `resource` to etcd; `cached`: the watch has delivered it."""
        revision = await self.store.put(self.keys.desired(resource.key), json.dumps(resource.model_dump()).encode())
        if cached:
            self.cache.desired[resource.key] = DesiredEntry(key=resource.key, mod_revision=revision, resource=resource)
        return revision

    async def delete(self, key: ResourceKey) -> int:
        """Delete the desired value in etcd, and deliver the deletion to the cache as the watch would."""
        await self.store.delete(self.keys.desired(key))
        revision = await self.store.ping()  # the deletion's revision: nothing else writes meanwhile
        entry = self.cache.desired[key]
        self.cache.desired[key] = DesiredEntry(key=key, mod_revision=revision, resource=entry.resource, deleted=True)
        return revision

    async def status(self, name: str, kind: str = "file") -> dict[str, Any]:
        kv = await self.store.get(self.keys.status(ResourceKey(kind=kind, name=name)))
        assert kv is not None, f"no status for {kind}/{name}"
        return dict(json.loads(kv.value))

    async def record(self, plan_id: str) -> dict[str, Any]:
        kv = await self.store.get(self.keys.plan(plan_id))
        assert kv is not None
        return dict(json.loads(kv.value))


def pipeline(
    store: EtcdStore,
    root: Path,
    *,
    parts: Assembly | None = None,
    policies: dict[str, Any] | None = None,
    **settings: Any,
) -> Pipeline:
    """`settings` are reconciler settings; `policies` the policy file's content; `parts` replace the built-in
    agents."""
    config = Settings.model_validate(
        {
            "agents": {"file": {"allowed_roots": [str(root)]}},
            "reconciler": settings,
            "policies": {"file": write_policies(root, policies) if policies is not None else None},
        }
    )
    keys = KeySpace(f"/pipe-{uuid.uuid4().hex[:8]}")
    cache = Cache(keys)
    runtime = build(
        config, parts=parts or assemble(config), store=store, keys=keys, cache=cache, metrics=Metrics(),
        clock=SystemClock(),
    )  # fmt: skip
    return Pipeline(runtime=runtime, store=store, keys=keys, cache=cache, root=root)
