"""`setpoint run` as a real process: signals, start-up errors and what it says when it starts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import eventually

from plans import ResourceKey
from reconciler.embedded import EmbeddedEtcd, find_etcd_binary, read_endpoint_file
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore


class Process:
    """A `setpoint run` child whose JSON log lines are collected as they come."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.path = tmp / "config.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reconciler.cli", "run", "-c", str(self.path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=self.env,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode().rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e["event"] == name), None)

    async def wait_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while (found := self.event(name)) is None:
            assert self.proc is not None
            if self.proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"no {name} line; the daemon said:\n" + "\n".join(self.lines[-20:]))
            await asyncio.sleep(0.05)
        return found

    async def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None and self._reader is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def reap(self) -> None:
        """Kill if still running, and wait, while the event loop that started it still runs."""
        self.kill()
        if self.proc is not None:
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def processes() -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    yield started
    for p in started:
        await p.reap()


async def _run_until_ready_then_stop(p: Process) -> Process:
    await p.start()
    try:
        await p.wait_event("daemon.ready")
        assert p.proc is not None
        p.proc.terminate()
        assert await p.wait() == 0
    finally:
        p.kill()
    return p


def _config(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {"http": {"listen": "127.0.0.1:0"}, "state_dir": str(tmp / "state"), "log": {"level": "info"}, **extra}


async def test_sighup_reloads_a_valid_policy_file_and_keeps_the_old_policies_on_an_invalid_one(
    tmp_path: Path, processes: list[Process]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    policies = tmp_path / "policies.yaml"
    policies.write_text("defaults: {low: approve}\n")  # a file write (low) waits for a person
    agents = {"file": {"allowed_roots": [str(root)], "poll_seconds": 0.2}}
    p = Process(_config(tmp_path, policies={"file": str(policies)}, agents=agents), tmp_path)
    processes.append(p)
    await p.start()
    await p.wait_event("daemon.ready")
    endpoint = read_endpoint_file(tmp_path / "state")
    assert endpoint is not None and p.proc is not None
    keys = KeySpace("/setpoint")

    async with EtcdStore([endpoint]) as store:

        async def phase_of(name: str, phase: str) -> None:
            key = ResourceKey(kind="file", name=name)
            spec = {"path": str(root / name), "content": f"{name}\n"}
            await store.put(keys.desired(key), json.dumps({"kind": "file", "name": name, "spec": spec}).encode())

            async def check() -> bool:
                kv = await store.get(keys.status(key))
                return kv is not None and json.loads(kv.value)["phase"] == phase

            await eventually(check, what=f"file/{name} {phase}")

        await phase_of("one", "AwaitingApproval")
        policies.write_text("defaults: {low: sometimes}\n")
        p.proc.send_signal(signal.SIGHUP)
        refused = await p.wait_event("policies.reload_refused")
        assert refused["error"].startswith(f"policy file {policies} line 1: defaults.low"), refused
        await phase_of("two", "AwaitingApproval")  # the old policies are still in force

        policies.write_text("defaults: {low: auto}\n")
        p.proc.send_signal(signal.SIGHUP)
        await p.wait_event("policies.reloaded")
        await phase_of("three", "Converged")
        assert (root / "three").read_text() == "three\n"
        assert not (root / "two").exists()  # the plan waiting for approval is kept as it was made
    assert p.proc.returncode is None, "SIGHUP must not stop the daemon"


async def test_a_taken_http_port_is_one_sentence_not_a_traceback(tmp_path: Path, processes: list[Process]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = Process(_config(tmp_path, http={"listen": f"127.0.0.1:{port}"}), tmp_path)  # the embedded etcd
        processes.append(p)
        await p.start()
        code = await p.wait()

    assert code == 1
    text = "\n".join(p.lines)
    assert "Traceback" not in text, text
    assert p.lines[-1] == f"setpoint: cannot listen on 127.0.0.1:{port} (http.listen): address already in use"
    assert p.event("etcd.embedded.started") is None, "it found out only after starting etcd"


async def test_an_address_that_does_not_resolve_says_so(tmp_path: Path, processes: list[Process]) -> None:
    p = Process(_config(tmp_path, http={"listen": "no-such-host.invalid:9464"}), tmp_path)
    processes.append(p)
    await p.start()

    assert await p.wait() == 1
    assert p.lines[-1].startswith("setpoint: cannot listen on no-such-host.invalid:9464 (http.listen): ")
    assert "unknown error" not in p.lines[-1].lower(), p.lines[-1]


async def test_start_up_logs_the_version_the_etcd_version_and_the_effective_settings(
    etcd: EmbeddedEtcd, tmp_path: Path, processes: list[Process]
) -> None:
    p = await _run_until_ready_then_stop(Process(_config(tmp_path, etcd={"endpoints": [etcd.endpoint]}), tmp_path))
    processes.append(p)

    starting = p.event("daemon.starting")
    connected = p.event("etcd.connected")
    assert starting is not None and connected is not None
    assert starting["version"] == "0.1.0"
    assert starting["settings"]["etcd"]["endpoints"] == [etcd.endpoint]
    assert starting["settings"]["reconciler"]["workers"] == 4, "every effective setting, defaults included"
    assert connected["etcd_version"].startswith("3.5.")


async def test_an_old_etcd_on_path_for_the_embedded_default_is_named_and_warned_about(
    tmp_path: Path, processes: list[Process]
) -> None:
    real = find_etcd_binary()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "etcd"  # says it is 3.4 when asked, and is the real etcd otherwise
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "etcd Version: 3.4.27"; echo "Git SHA: 0"; exit 0; fi\n'
        f'exec "{real}" "$@"\n'
    )
    fake.chmod(0o755)
    p = await _run_until_ready_then_stop(
        Process(_config(tmp_path), tmp_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    )
    processes.append(p)

    embedded = p.event("etcd.embedded")
    assert embedded is not None and embedded["etcd_version"] == "3.4.27" and embedded["binary"] == str(fake)
    warning = p.event("etcd.embedded.too_old")
    assert warning is not None and warning["level"] == "warning", p.lines


async def test_when_the_embedded_etcd_dies_the_daemon_exits_1_instead_of_standing_ready(
    tmp_path: Path, processes: list[Process]
) -> None:
    p = Process(_config(tmp_path), tmp_path)
    processes.append(p)
    await p.start()
    await p.wait_event("daemon.ready")
    started = p.event("etcd.embedded.started")
    assert started is not None

    os.kill(started["pid"], signal.SIGKILL)

    assert await p.wait(timeout=30) == 1
    stopped = [e for e in p.events() if e["event"] == "daemon.component_stopped"]
    assert stopped and stopped[0]["component"] == "etcd", p.lines[-10:]
    assert "exited" in stopped[0]["error"]


async def test_a_second_daemon_on_the_same_state_directory_names_the_first(
    tmp_path: Path, processes: list[Process]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(tmp_path, http={"listen": f"127.0.0.1:{port}"})  # one config, as a second start would use
    first = Process(config, tmp_path)
    processes.append(first)
    await first.start()
    await first.wait_event("daemon.ready")

    (tmp_path / "second").mkdir()
    second = Process(config, tmp_path / "second")  # the same settings, the same absolute state_dir
    processes.append(second)
    await second.start()

    assert await second.wait() == 1
    assert first.proc is not None
    state = tmp_path / "state"
    assert second.lines[-1] == (
        f"setpoint: another setpoint daemon (pid {first.proc.pid}) is using state directory {state}"
    )
