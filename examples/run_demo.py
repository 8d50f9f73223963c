"""The Quickstart: start setpoint in the background on its embedded etcd, apply the examples, show them converged.

    python examples/run_demo.py --config setpoint.yaml --resources examples/resources.yaml
    python examples/run_demo.py --config setpoint.yaml --stop

`${DEMO_ROOT}` in the resources file is replaced by the first of the file
agent's allowed roots, so the examples work from any checkout location.
The daemon keeps running after this script exits; its log is
`<state_dir>/setpoint.log` and its pid is in `<state_dir>/setpoint.pid`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from reconciler.settings import Settings, load_settings

SETPOINT = [sys.executable, "-m", "reconciler.cli"]


def _pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "setpoint.pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _ready(settings: Settings) -> bool:
    try:
        with urllib.request.urlopen(f"http://{settings.http.listen}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start(config: Path, settings: Settings) -> int:
    state_dir = settings.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    pid = _pid(state_dir)
    if pid is not None:
        print(f"setpoint is already running (pid {pid})")
        return pid
    log_path = state_dir / "setpoint.log"
    endpoint = state_dir / "endpoint"
    endpoint.unlink(missing_ok=True)  # left by a daemon that was killed; ours writes it anew
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*SETPOINT, "run", "-c", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    (state_dir / "setpoint.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    # Ready means this daemon: another one may be answering on the same port.
    while not (endpoint.exists() and _ready(settings) and proc.poll() is None):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace").splitlines()[-10:]
            sys.exit("setpoint did not become ready; last log lines:\n" + "\n".join(tail))
        time.sleep(0.1)
    print(f"setpoint is running (pid {proc.pid}); log: {log_path}")
    return proc.pid


def apply(config: Path, settings: Settings, resources: Path) -> list[str]:
    roots = settings.agents.file.allowed_roots
    if not roots:
        sys.exit("the example config needs agents.file.allowed_roots")
    Path(roots[0]).mkdir(parents=True, exist_ok=True)
    text = resources.read_text().replace("${DEMO_ROOT}", roots[0])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        result = subprocess.run([*SETPOINT, "apply", "-f", f.name, "-c", str(config)], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if result.returncode != 0:
        sys.exit(result.stderr.strip())
    print(result.stdout, end="")
    return [line.split()[0] for line in result.stdout.splitlines()]


def wait_converged(config: Path, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    pending = set(names)
    while pending and time.monotonic() < deadline:
        result = subprocess.run([*SETPOINT, "status", "-o", "json", "-c", str(config)], capture_output=True, text=True)
        if result.returncode == 0:
            phases = {row["resource"]: row["phase"] for row in json.loads(result.stdout)}
            pending = {n for n in names if phases.get(n) != "Converged"}
        time.sleep(0.2)
    print()
    subprocess.run([*SETPOINT, "status", "-c", str(config)])
    if pending:
        sys.exit(f"not converged after 30 s: {', '.join(sorted(pending))}")


def stop(settings: Settings) -> None:
    state_dir = settings.resolved_state_dir()
    pid = _pid(state_dir)
    if pid is None:
        print("setpoint is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while _pid(state_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    (state_dir / "setpoint.pid").unlink(missing_ok=True)
    print(f"setpoint (pid {pid}) stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--resources", type=Path)
    parser.add_argument("--stop", action="store_true")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if args.stop:
        stop(settings)
        return
    if args.resources is None:
        parser.error("--resources is required unless --stop is given")
    start(args.config, settings)
    names = apply(args.config, settings, args.resources)
    wait_converged(args.config, names)
    root = settings.agents.file.allowed_roots[0]
    setpoint = Path(sys.executable).parent / "setpoint"
    here = Path.cwd().resolve() == args.config.resolve().parent and args.config.name == "setpoint.yaml"
    env = "" if here else f"SETPOINT_CONFIG={args.config.resolve()} "
    print(
        f"\nsetpoint keeps these files at their desired state. Edit or delete one under {root} and it is\n"
        f"restored within {settings.agents.file.poll_seconds:g} s. `make stop` stops the daemon.\n\n"
        f"Next, from this directory:\n"
        f"  {env}{os.path.relpath(setpoint)} status\n"
        f"  {env}{os.path.relpath(setpoint)} plans list\n"
        f"  {env}{os.path.relpath(setpoint)} --help"
    )


if __name__ == "__main__":
    main()
