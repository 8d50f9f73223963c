"""A handle on the real daemon, run in-process against the session's real etcd, and polling helpers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from plans import ResourceKey
from reconciler.assembly import Assembly
from reconciler.daemon import Daemon
from reconciler.embedded import EmbeddedEtcd
from reconciler.keys import KeySpace
from reconciler.settings import PolicySettings, Settings
from reconciler.store import EtcdStore

POLL_SECONDS = 0.2


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or check}; last value {last!r}")
        await asyncio.sleep(0.05)


def sample_value(registry: CollectorRegistry, sample: str) -> float | None:
    """The value of one sample (`name{labels}` as exposed) in `registry`, or None when it has none."""
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass
class Harness:
    store: EtcdStore
    keys: KeySpace
    root: Path
    settings: Settings
    daemon: Daemon | None = None
    assembly: Assembly | None = None  # agents, tools and policies other than the built-in ones
    _task: asyncio.Task[int] | None = field(default=None, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)

    def resource(self, name: str, content: str, *, mode: str | None = None, path: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"path": path or str(self.root / name), "content": content}
        if mode is not None:
            spec["mode"] = mode
        return {"kind": "file", "name": name, "spec": spec}

    @staticmethod
    def daemon_key(name: str, kind: str = "file") -> ResourceKey:
        return ResourceKey(kind=kind, name=name)

    async def put_desired(self, value: dict[str, Any] | bytes, *, name: str | None = None) -> int:
        if isinstance(value, dict):
            key = ResourceKey(kind=value["kind"], name=value["name"])
            raw = json.dumps(value).encode()
        else:
            assert name is not None
            key = ResourceKey(kind="file", name=name)
            raw = value
        return await self.store.put(self.keys.desired(key), raw)

    async def status(self, name: str, kind: str = "file") -> dict[str, Any] | None:
        kv = await self.store.get(self.keys.status(ResourceKey(kind=kind, name=name)))
        return json.loads(kv.value) if kv else None

    async def wait_status(
        self, name: str, phase: str, *, revision: int | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.status(name)
            if status and status["phase"] == phase and (revision is None or status["observed_revision"] == revision):
                return status
            return None

        result: dict[str, Any] = await eventually(
            check, timeout=timeout, what=f"file/{name} phase {phase} at revision {revision}"
        )
        return result

    async def report_issue(
        self, name: str, issue_id: str, summary: str = "broken", *, kind: str = "file", **fields: Any
    ) -> int:
        """Put the issue `issue_id` on `kind/name` (source "test" unless given); its revision."""
        value = {"summary": summary, "source": "test", **fields}
        key = self.keys.issue(ResourceKey(kind=kind, name=name), issue_id)
        return await self.store.put(key, json.dumps(value).encode())

    async def resolve_issue(self, name: str, issue_id: str, *, kind: str = "file") -> None:
        await self.store.delete(self.keys.issue(ResourceKey(kind=kind, name=name), issue_id))

    async def issue_states(self, name: str, kind: str = "file") -> dict[str, dict[str, Any]]:
        """The issues the status of `kind/name` lists, by id."""
        status = await self.status(name, kind) or {}
        return {issue["id"]: issue for issue in status.get("issues", [])}

    async def wait_issue(self, name: str, issue_id: str, state: str, *, kind: str = "file") -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            issue = (await self.issue_states(name, kind)).get(issue_id)
            return issue if issue is not None and issue["state"] == state else None

        found: dict[str, Any] = await eventually(check, what=f"issue {issue_id} on {kind}/{name} to be {state}")
        return found

    async def metric(self, sample: str) -> float | None:
        """The value of one sample (`name{labels}` as exposed) on the daemon's /metrics, or None."""
        assert self.daemon is not None
        return sample_value(self.daemon.metrics.registry, sample)

    def use_policies(self, policies: dict[str, Any]) -> None:
        """Run the daemon (at its next start) with `policies` as its policy file."""
        path = write_policies(self.root.parent, policies)
        self.settings = self.settings.model_copy(update={"policies": PolicySettings(file=path)})

    async def plan_record(self, plan_id: str) -> dict[str, Any]:
        kv = await self.store.get(self.keys.plan(plan_id))
        assert kv is not None, f"no plan record for {plan_id}"
        return dict(json.loads(kv.value))

    async def start(self) -> Daemon:
        self.daemon = Daemon(self.settings, assembly=self.assembly)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.daemon.run(self._stop))
        ready = asyncio.ensure_future(self.daemon.ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            outcome = self._task.result() if self._task.done() else "timeout"
            raise AssertionError(f"daemon did not become ready: {outcome}")
        return self.daemon

    async def stop(self) -> int:
        assert self._stop is not None and self._task is not None
        self._stop.set()
        return await asyncio.wait_for(self._task, timeout=30)


# Deletions (file.delete is high risk) run without waiting for a person: for tests of what follows them.
DELETES_RUN = {"defaults": {"high": "auto"}}


def write_policies(directory: Path, policies: dict[str, Any]) -> str:
    """A policy file in `directory` holding `policies`; its path, for `policies.file`."""
    path = directory / f"policies-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(policies))
    return str(path)


def make_settings(
    etcd: EmbeddedEtcd, prefix: str, root: Path, *, policies: dict[str, Any] | None = None, **reconciler: Any
) -> Settings:
    """Settings for a test daemon; `policies` is written to a policy file next to `root`."""
    return Settings.model_validate(
        {
            "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix},
            "http": {"listen": "127.0.0.1:0"},
            "reconciler": {"workers": 2, "resync_seconds": 30, "backoff_base_seconds": 0.05, **reconciler},
            "agents": {"file": {"allowed_roots": [str(root)], "poll_seconds": POLL_SECONDS}},
            "policies": {"file": write_policies(root.parent, policies) if policies is not None else None},
            "log": {"level": "warning"},
        }
    )
