"""The `setpoint` command as users run it: a real daemon process, `apply`, `status`, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reconciler.embedded import EmbeddedEtcd

SETPOINT = [sys.executable, "-m", "reconciler.cli"]


def run_cli(
    *args: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`setpoint ARGS` as a user runs it; from a directory with no setpoint.yaml unless `cwd` is given."""
    environment = {k: v for k, v in os.environ.items() if k != "SETPOINT_CONFIG"} | (env or {})
    result = subprocess.run(
        [*SETPOINT, *args], capture_output=True, text=True, timeout=60, cwd=cwd or tempfile.gettempdir(),
        env=environment, input=stdin,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"setpoint {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


@pytest.fixture
def config(etcd: EmbeddedEtcd, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "etcd": {"endpoints": [etcd.endpoint], "prefix": f"/cli-{uuid.uuid4().hex[:8]}"},
                "http": {"listen": "127.0.0.1:0"},
                "reconciler": {"workers": 2, "shutdown_timeout_seconds": 10},
                "agents": {"file": {"allowed_roots": [str(root)], "poll_seconds": 0.2}},
            }
        )
    )
    return path


@pytest.fixture
def daemon(config: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(tmp_path / "daemon.log", "wb")
    proc = subprocess.Popen([*SETPOINT, "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while b'"daemon.ready"' not in (tmp_path / "daemon.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"daemon did not start: {(tmp_path / 'daemon.log').read_text()}")
        time.sleep(0.05)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def wait_phase(config: Path, resource: str, phase: str, timeout: float = 15) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        result = run_cli("status", resource, "-o", "json", "-c", str(config), check=False)
        if result.returncode == 0:
            status: dict[str, object] = json.loads(result.stdout)
            if status["phase"] == phase:
                return status
        if time.monotonic() > deadline:
            pytest.fail(f"{resource} never reached {phase}: {result.stdout} {result.stderr}")
        time.sleep(0.1)


def test_apply_status_and_sigterm(daemon: subprocess.Popen[bytes], config: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    resources = tmp_path / "resources.yaml"
    resources.write_text(
        f"kind: file\nname: a\nspec: {{path: {root / 'a'}, content: \"A\\n\"}}\n---\n"
        f"- {{kind: file, name: b, spec: {{path: {root / 'b'}, content: \"B\\n\", mode: \"0600\"}}}}\n"
    )

    applied = run_cli("apply", "-f", str(resources), "-c", str(config))

    assert applied.stdout.splitlines() == ["file/a applied", "file/b applied"]
    wait_phase(config, "file/a", "Converged")
    wait_phase(config, "file/b", "Converged")
    assert (root / "a").read_text() == "A\n"
    table = run_cli("status", "-c", str(config)).stdout
    assert table.splitlines()[0].split()[:2] == ["RESOURCE", "PHASE"]
    assert any(line.startswith("file/b") and "Converged" in line for line in table.splitlines())

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


def test_apply_rejects_an_invalid_document_and_writes_nothing(config: Path, tmp_path: Path) -> None:
    resources = tmp_path / "bad.yaml"
    resources.write_text(
        "kind: file\nname: fine\nspec: {path: /tmp/x, content: ''}\n---\n"
        "kind: file\nname: Not_Valid\nspec: {}\n"
    )

    result = run_cli("apply", "-f", str(resources), "-c", str(config), check=False)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"setpoint: {resources} line 6: field 'name': name 'Not_Valid' does not match [a-z0-9][a-z0-9._-]{{0,62}}"
    )
    assert len(result.stderr.strip().splitlines()) == 1, "error must be one line, no traceback"
    missing = run_cli("status", "file/fine", "-c", str(config), check=False)
    assert missing.returncode == 1
    assert "no status for file/fine" in missing.stderr


def test_bad_settings_file_is_one_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("reconciler:\n  workerz: 3\n")

    result = run_cli("status", "-c", str(config), check=False)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"setpoint: settings file {config} line 2: reconciler.workerz is not a known setting"
    )


def test_sigterm_while_a_plan_is_running_exits_zero_with_no_step_left_running(
    etcd: EmbeddedEtcd, config: Path, tmp_path: Path
) -> None:
    # Many resources so that SIGTERM lands while workers are mid-plan.
    root = tmp_path / "root"
    docs = [
        {"kind": "file", "name": f"f{i}", "spec": {"path": str(root / f"f{i}"), "content": "x" * 100_000}}
        for i in range(100)
    ]
    resources = tmp_path / "many.yaml"
    resources.write_text(yaml.safe_dump_all(docs))
    run_cli("apply", "-f", str(resources), "-c", str(config))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*SETPOINT, "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while b'"plan.executing"' not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "daemon.stopping" for e in events)
    prefix = yaml.safe_load(config.read_text())["etcd"]["prefix"]
    listing = subprocess.run(
        [os.path.join(os.path.dirname(etcd.binary), "etcdctl"), "--endpoints", etcd.endpoint, "get", "--prefix",
         f"{prefix}/plans/", "--print-value-only"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    records = [json.loads(line) for line in listing.stdout.splitlines() if line.strip()]
    assert records, "no plan ran before SIGTERM"
    for record in records:
        assert record["state"] != "executing", record
        assert all(step["state"] != "running" for step in record["steps"]), record


def test_output_into_a_closed_pipe_ends_quietly_like_other_unix_tools(config: Path) -> None:
    """`setpoint status | head -1`: the reader may be gone before setpoint writes."""
    read, write = os.pipe()
    proc = subprocess.Popen([*SETPOINT, "status", "-c", str(config)], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    os.close(read)  # the reader is gone before setpoint has written anything
    _, err = proc.communicate(timeout=60)

    assert err.decode() == "", "no traceback, no message: the reader chose to stop reading"
    assert proc.returncode == 128 + signal.SIGPIPE, "as a shell reports a process ended by SIGPIPE"
