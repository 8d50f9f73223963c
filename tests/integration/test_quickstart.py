"""The Quickstart as a user runs it: `examples/run_demo.py` starts the daemon on its embedded etcd, applies the
examples, and the web server it keeps running is restarted when killed and healed through an issue when it hangs
or fails; both are recorded as plans. `--stop` stops the web server and the daemon.

The settings are the shipped `setpoint.yaml`, moved to a temporary directory (state, ports, roots)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, str(ROOT / "examples" / "run_demo.py")]
SETPOINT = [sys.executable, "-m", "reconciler.cli"]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return str(resp.read().decode())
    except (OSError, urllib.error.URLError):
        return None


def _post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=2).close()


def _until(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], str]]:
    settings = yaml.safe_load((ROOT / "setpoint.yaml").read_text())
    settings["state_dir"] = str(tmp_path / "state")
    settings["http"]["listen"] = f"127.0.0.1:{free_port()}"
    settings["agents"]["file"]["allowed_roots"] = [str(tmp_path / "demo")]
    settings["agents"]["process"]["allowed_executables"] = [str(ROOT / "examples" / "webapp.py")]
    config = tmp_path / "setpoint.yaml"
    config.write_text(yaml.safe_dump(settings))
    port = free_port()
    env = {**os.environ, "SETPOINT_DEMO_PORT": str(port)}
    env.pop("SETPOINT_CONFIG", None)
    yield config, env, f"http://127.0.0.1:{port}"
    subprocess.run([*DEMO, "--config", str(config), "--stop"], env=env, capture_output=True, timeout=90)


def _plans(config: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    listed = subprocess.run(
        [*SETPOINT, "plans", "list", "process/webapp", "-o", "json", "-c", str(config)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    plans: list[dict[str, Any]] = json.loads(listed.stdout)
    return plans


def _pid(text: str | None) -> int | None:
    return int(text.split()[2].rstrip(":")) if text and text.startswith("webapp pid") else None


def test_the_quickstart_restarts_a_killed_web_server_and_heals_a_hung_one(
    demo: tuple[Path, dict[str, str], str],
) -> None:
    config, env, url = demo
    run = subprocess.run(
        [*DEMO, "--config", str(config), "--resources", str(ROOT / "examples" / "resources.yaml")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "process/webapp" in run.stdout and "http_check/webapp" in run.stdout
    first = _pid(_until(lambda: _get(url + "/"), "the web server"))
    assert first is not None

    os.kill(first, signal.SIGKILL)  # a crash: restarted at once, as a plan
    second = _until(lambda: (p := _pid(_get(url + "/"))) not in (None, first) and p, "a restart after kill -9")
    _until(lambda: len(_plans(config, env)) >= 2, "the restart's plan")

    _post(url + "/-/hang")  # a hang: the check fails, an issue is reported, the process agent restarts it
    third = _until(lambda: (p := _pid(_get(url + "/"))) not in (None, second) and p, "a heal of the hung server")
    plans = _until(lambda: (p := _plans(config, env)) and p[-1]["state"] == "succeeded" and len(p) >= 3 and p,
                   "the heal's plan")  # fmt: skip
    heal = plans[-1]
    assert (heal["risk"], heal["decision"]) == ("medium", "notify")
    shown = subprocess.run([*SETPOINT, "plans", "show", heal["id"], "-c", str(config)], env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "process.restart" in shown and "http_check/webapp" in shown
    assert "verify     verified: actual matches desired" in shown
    assert third not in (first, second)

    stop = subprocess.run([*DEMO, "--config", str(config), "--stop"], env=env, capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    _until(lambda: _get(url + "/") is None, "the web server to stop with the demo")
