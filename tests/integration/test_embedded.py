"""The embedded default: `setpoint run` with no etcd endpoints starts and owns a local etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SETPOINT = [sys.executable, "-m", "reconciler.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _etcd_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "etcd" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*SETPOINT, "run", "-c", str(config)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while b'"daemon.ready"' not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"daemon did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "state_dir": "state",
                "http": {"listen": "127.0.0.1:0"},
                "agents": {"file": {"allowed_roots": ["root"], "poll_seconds": 0.2}},
            }
        )
    )
    return path


def test_embedded_etcd_serves_apply_and_status_and_survives_a_daemon_crash(config: Path, tmp_path: Path) -> None:
    resources = tmp_path / "r.yaml"
    resources.write_text(f"kind: file\nname: hello\nspec: {{path: {tmp_path / 'root' / 'hello'}, content: hi}}\n")
    daemon = _start(config, tmp_path / "run1.log")
    try:
        assert (tmp_path / "state" / "endpoint").read_text().startswith("127.0.0.1:")
        etcd_pids = _etcd_children(daemon.pid)
        assert len(etcd_pids) == 1, "the daemon should run exactly one etcd"
        subprocess.run([*SETPOINT, "apply", "-f", str(resources), "-c", str(config)], check=True, timeout=30)
        deadline = time.monotonic() + 15
        while (tmp_path / "root" / "hello").exists() is False and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "root" / "hello").read_text() == "hi"

        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        deadline = time.monotonic() + 10
        while _alive(etcd_pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(etcd_pids[0]), "etcd outlived its SIGKILLed daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()

    # Restart on the same data: the desired state is still there and still converged.
    daemon = _start(config, tmp_path / "run2.log")
    try:
        status = subprocess.run(
            [*SETPOINT, "status", "file/hello", "-o", "json", "-c", str(config)],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert json.loads(status.stdout)["phase"] == "Converged"
        second = subprocess.run([*SETPOINT, "run", "-c", str(config)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert f"another setpoint daemon (pid {daemon.pid}) is using state directory" in second.stderr
        etcd_pids = _etcd_children(daemon.pid)
        assert len(etcd_pids) == 1
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert not _alive(etcd_pids[0]), "a clean stop must stop the embedded etcd"
    finally:
        if daemon.poll() is None:
            daemon.kill()
    stopped = subprocess.run([*SETPOINT, "status", "-c", str(config)], capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 1
    assert "no etcd to talk to" in stopped.stderr
