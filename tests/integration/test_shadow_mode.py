"""Shadow mode: plans are made, gated and recorded with decision `shadow`, and nothing is executed.

A real daemon runs with `agents.file.mode: shadow`; then the same daemon
runs in `enforce`, and `setpoint plans list --shadow` puts what would have
run next to what did.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from pipeline import pipeline
from test_cli import SETPOINT, config, run_cli, wait_phase  # noqa: F401  (fixtures)

from agents import AgentRegistry
from agents.builtin.file import FileAgent
from plans import PlanRecord, PlanState, Snapshot
from policies import Policies
from reconciler.assembly import Assembly
from reconciler.embedded import EmbeddedEtcd
from reconciler.outcome import Result
from reconciler.shadow import ShadowMode
from reconciler.status import Phase, Status
from reconciler.store import EtcdStore
from tools import ToolRegistry


@contextmanager
def running(config: Path, log: Path) -> Iterator[None]:  # noqa: F811
    with open(log, "ab") as out:
        proc = subprocess.Popen([*SETPOINT, "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    try:
        while log.read_bytes().count(b'"daemon.ready"') < 1 + log.read_bytes().count(b'"daemon.stopped"'):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _mode(config: Path, mode: str) -> None:  # noqa: F811
    settings = yaml.safe_load(config.read_text())
    settings["agents"]["file"]["mode"] = mode
    config.write_text(yaml.safe_dump(settings))


def _shadows(config: Path) -> list[dict[str, object]]:  # noqa: F811
    listed: list[dict[str, object]] = json.loads(
        run_cli("plans", "list", "--shadow", "-o", "json", "-c", str(config)).stdout
    )
    return listed


def test_shadow_mode_records_plans_and_executes_nothing(config: Path, tmp_path: Path) -> None:  # noqa: F811
    target = tmp_path / "root" / "motd"
    resource = tmp_path / "motd.yaml"
    resource.write_text(
        yaml.safe_dump({"kind": "file", "name": "motd", "spec": {"path": str(target), "content": "hi\n"}})
    )
    _mode(config, "shadow")
    log = tmp_path / "daemon.log"
    with running(config, log):
        run_cli("apply", "-f", str(resource), "-c", str(config))
        status = wait_phase(config, "file/motd", "Pending")
        assert str(status["message"]).startswith("shadow mode: plan ")
        time.sleep(1.0)  # a few poll passes and reconciles: the same plan is recorded once
        shadows = _shadows(config)
    assert not target.exists(), "a plan in shadow ran"
    assert len(shadows) == 1, shadows
    shadow = shadows[0]
    assert shadow["then"] is None
    assert "would have decided auto" in str(shadow["decision_reason"])
    record = json.loads(run_cli("plans", "show", str(shadow["id"]), "-o", "json", "-c", str(config)).stdout)
    assert (record["state"], record["decision"]) == ("shadow", "shadow")
    assert [step["state"] for step in record["steps"]] == ["skipped"]

    _mode(config, "enforce")
    with running(config, log):
        wait_phase(config, "file/motd", "Converged")
        then = _shadows(config)[0]["then"]
    assert target.read_text() == "hi\n"
    assert isinstance(then, dict) and then["state"] == "succeeded" and then["same_steps"] is True, then


async def test_a_plan_left_unfinished_is_not_resumed_once_its_agent_is_in_shadow(etcd: EmbeddedEtcd,
                                                                                  tmp_path: Path) -> None:
    agent = FileAgent(allowed_roots=[str(tmp_path)])
    parts = Assembly(agents=AgentRegistry([agent]), tools=ToolRegistry(agent.tools()), policies=Policies(),
                     poll_seconds={"file": 60}, shadow=ShadowMode(agents=frozenset({"file"})))  # fmt: skip
    async with EtcdStore([etcd.endpoint]) as store:
        p = pipeline(store, tmp_path, parts=parts)
        resource = p.file("motd", "hi\n")
        revision = await p.put(resource)
        # What a daemon stopped between plan and step leaves: a plan begun, its step still pending.
        plan = await agent.reconcile(Snapshot(desired=resource, revision=revision))
        record = PlanRecord.start(plan, decision="auto")
        record.state = PlanState.EXECUTING
        await store.put(p.keys.plan(record.plan.id), record.model_dump_json().encode())
        status = Status(phase=Phase.EXECUTING, observed_revision=revision, plan_id=record.plan.id,
                        updated_at=record.created_at)  # fmt: skip
        await store.put(p.keys.status(resource.key), status.model_dump_json().encode())
        assert await p.runtime.resumer.load(asyncio.Event()) == {resource.key}

        outcome = await p.runtime.reconciler.reconcile(resource.key)

        assert outcome.result is Result.SHADOW
        assert not (tmp_path / "motd").exists(), "a plan in shadow ran because it was resumed"
        stopped = await p.record(record.plan.id)
        assert stopped["state"] == "superseded" and "agents.file.mode is shadow" in stopped["message"]
