"""Children started while gRPC's threads run (the embedded etcd restarted under load) start cleanly."""

from __future__ import annotations

import asyncio
import subprocess

from reconciler.embedded import EmbeddedEtcd, spawn_child
from reconciler.store import EtcdStore

SPAWNS = 300  # with a Python preexec_fn, a few in a hundred of these children crashed


async def test_children_start_cleanly_while_grpc_threads_are_busy(etcd: EmbeddedEtcd) -> None:
    async with EtcdStore([etcd.endpoint]) as store:

        async def load() -> None:
            while True:
                await asyncio.gather(*(store.ping() for _ in range(4)))

        busy = asyncio.create_task(load())
        failed = []
        try:
            for _ in range(SPAWNS):
                await asyncio.sleep(0.001)  # requests in flight on gRPC's threads
                child = spawn_child(["true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                code = await asyncio.to_thread(child.wait)
                if code != 0:
                    failed.append(code)
        finally:
            busy.cancel()
    assert failed == [], f"{len(failed)} of {SPAWNS} children died before running: {failed[:5]}"
