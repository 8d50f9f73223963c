"""The Quickstart: start setpoint in the background on its embedded etcd, apply the examples, show them converged.

    python examples/run_demo.py --config setpoint.yaml --resources examples/resources.yaml
    python examples/run_demo.py --config setpoint.yaml --stop

`${DEMO_ROOT}` in the resources file is replaced by the first of the file
agent's allowed roots, so the examples work from any checkout location;
`${EXAMPLES}` by this directory, and
`${WEBAPP_PORT}` by $SETPOINT_DEMO_PORT, else 18080 (the web server the demo
keeps running, examples/webapp.py). `--stop` deletes the demo's process
resources first, so the web server stops with the daemon.
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
EXAMPLES = Path(__file__).resolve().parent
DEMO_PROCESSES = ("http_check/webapp", "process/webapp")  # deleted by --stop, the check first


def webapp_port() -> int:
    return int(os.environ.get("SETPOINT_DEMO_PORT", "18080"))


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
    text = resources.read_text()
    tokens = {"${DEMO_ROOT}": roots[0], "${EXAMPLES}": str(EXAMPLES), "${WEBAPP_PORT}": str(webapp_port())}
    for token, value in tokens.items():
        text = text.replace(token, value)
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


def stop(config: Path, settings: Settings) -> None:
    state_dir = settings.resolved_state_dir()
    pid = _pid(state_dir)
    if pid is None:
        print("setpoint is not running")
        return
    for resource in DEMO_PROCESSES:  # `process.stop` runs for the web server before the daemon goes
        subprocess.run([*SETPOINT, "delete", resource, "-c", str(config)], capture_output=True, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = subprocess.run([*SETPOINT, "status", "-o", "json", "-c", str(config)], capture_output=True, text=True)
        if result.returncode != 0 or not {row["resource"] for row in json.loads(result.stdout)} & set(DEMO_PROCESSES):
            break
        time.sleep(0.2)
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
        stop(args.config, settings)
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
    cli = f"{env}{os.path.relpath(setpoint)}"
    url = f"http://127.0.0.1:{webapp_port()}"
    print(
        f"\nsetpoint keeps these files at their desired state. Edit or delete one under {root} and it is\n"
        f"restored within {settings.agents.file.poll_seconds:g} s. It keeps the web server at {url}/ running and\n"
        f"healthy: kill it (pkill -9 -f {EXAMPLES}/webapp.py) and it is restarted at once; make it\n"
        f"fail (curl -X POST {url}/-/fail) or hang (curl -X POST {url}/-/hang) and its check reports an\n"
        f"issue, which is healed by restarting it. `make stop` stops the web server and the daemon.\n\n"
        f"Next, from this directory:\n"
        f"  {cli} status\n"
        f"  {cli} plans list process/webapp\n"
        f"  {cli} plans show <ID>\n"
        f"  {cli} --help"
    )


if __name__ == "__main__":
    main()
