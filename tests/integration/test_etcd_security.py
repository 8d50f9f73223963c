"""setpoint against an etcd with TLS, client certificates, authentication and roles: real etcd 3.5.1 processes.

Three etcds, one per kind of security, each for the whole module:
- `tls_etcd` serves TLS and asks for client certificates (`--client-cert-auth`), with authentication off:
  the right certificates work, no certificate, another CA, plain text or the wrong server name are refused
  with a sentence saying which;
- `jwt_etcd` adds authentication with JWT tokens that expire after 2 s (`--auth-token jwt,...,ttl=2s`):
  the daemon, as a user holding the README's daemon role, keeps converging across many token lifetimes and
  an etcd restart; the role lets it do its job and nothing else; operators, with the README's operator role,
  `apply` and `approve`;
- `simple_etcd` has authentication with etcd's default simple tokens, forgotten after 2 s unused
  (`--auth-token-ttl 2`) and at every restart: requests after a quiet spell, and watches re-created after a
  restart, get a new token; concurrent requests share one renewal.

The CA, the certificates and the JWT keys are made here (tests/pki.py); the roles are the README's own
`etcdctl role` commands (tests/secure_etcd.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from harness import Harness, eventually, make_settings
from pki import Authority, jwt_keys
from secure_etcd import ROOT_PASSWORD, SecureEtcd, readme_roles, unique
from structlog.testing import capture_logs
from test_cli import SETPOINT, run_cli

from reconciler.connect import CredentialsError, open_store
from reconciler.daemon import Daemon
from reconciler.errors import StartupError
from reconciler.keys import KeySpace, Section
from reconciler.logs import configure_logging
from reconciler.settings import EtcdSettings, EtcdTlsSettings, HttpSettings, Settings
from reconciler.store import (
    Credentials,
    EtcdStore,
    StoreAccessError,
    StoreUnavailableError,
    range_end,
)

TOKEN_TTL_SECONDS = 2
LOOPBACK_HTTP = HttpSettings(listen="127.0.0.1:0")


# --- etcd processes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> Iterator[SecureEtcd]:
    etcd = SecureEtcd(tmp_path_factory.mktemp("tls-etcd"), pki=ca, client_cert_auth=True)
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def jwt_etcd(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> Iterator[SecureEtcd]:
    base = tmp_path_factory.mktemp("jwt-etcd")
    public, private = jwt_keys(base / "jwt")
    token = f"jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl={TOKEN_TTL_SECONDS}s"
    etcd = SecureEtcd(base, pki=ca, client_cert_auth=True, auth_flags=["--auth-token", token])
    etcd.start()
    etcd.enable_auth()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def simple_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    etcd = SecureEtcd(
        tmp_path_factory.mktemp("simple-etcd"), auth_flags=["--auth-token", "simple", "--auth-token-ttl", "2"]
    )
    etcd.start()
    etcd.enable_auth()
    yield etcd
    etcd.stop()


# --- helpers -------------------------------------------------------------------------------------------------


class Team:
    """The README's roles on a fresh prefix, a daemon user and an operator user holding them."""

    def __init__(self, etcd: SecureEtcd, directory: Path) -> None:
        self.etcd = etcd
        self.prefix = f"/sec-{uuid.uuid4().hex[:8]}"
        suffix = "-" + self.prefix[5:]
        for command in readme_roles(self.prefix, suffix):
            etcd.etcdctl(*command)
        self.daemon_user, self.operator_user = unique("daemon"), unique("operator")
        etcd.add_user(self.daemon_user, "daemon-password", f"setpoint-daemon{suffix}")
        etcd.add_user(self.operator_user, "operator-password", f"setpoint-operator{suffix}")
        self.daemon_password = directory / "daemon-password"
        self.daemon_password.write_text("daemon-password\n")
        self.operator_password = directory / "operator-password"
        self.operator_password.write_text("operator-password\n")
        self.keys = KeySpace(self.prefix)

    def etcd_settings(self, user: str | None = None, password_file: Path | None = None, **fields: Any) -> EtcdSettings:
        """`etcd` settings for the daemon user (or `user`), on this team's prefix."""
        return self.etcd.settings(
            self.prefix, username=user or self.daemon_user,
            password_file=str(password_file or self.daemon_password), **fields,
        )  # fmt: skip

    def config(self, directory: Path, user: str, password_file: Path) -> Path:
        """A settings file for the commands, as `user`, managing files in `directory`/root."""
        etcd = self.etcd_settings(user, password_file).model_dump(mode="json", exclude_defaults=True)
        path = directory / f"{user}.yaml"
        agents = {"file": {"allowed_roots": [str(directory / "root")]}}
        path.write_text(yaml.safe_dump({"etcd": etcd, "agents": agents}))
        return path


@pytest.fixture
async def root_of(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """`root_of(etcd)`: a connected client of `etcd` as root, closed after the test."""
    opened: list[EtcdStore] = []

    async def connect(etcd: SecureEtcd) -> EtcdStore:
        store = etcd.store()
        await store.connect()
        opened.append(store)
        return store

    yield connect
    for store in opened:
        await store.close()


async def harness_for(team: Team, root_store: EtcdStore, tmp_path: Path, **etcd_fields: Any) -> Harness:
    """The daemon (not started) as the team's daemon user; the harness itself reads and writes as root."""
    configure_logging("warning")
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    settings = make_settings(team.etcd, team.prefix, root)
    settings = settings.model_copy(update={"etcd": team.etcd_settings(**etcd_fields)})
    return Harness(store=root_store, keys=team.keys, root=root, settings=settings)


async def converge(h: Harness, name: str, content: str) -> None:
    revision = await h.put_desired(h.resource(name, content))
    await h.wait_status(name, "Converged", revision=revision, timeout=15)
    assert (h.root / name).read_text() == content


def one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setpoint: "), result.stderr
    return lines[0]


async def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`setpoint ARGS` in a thread, so that an in-process daemon keeps running meanwhile."""
    return await asyncio.to_thread(run_cli, *args, check=check)


# --- TLS and client certificates -----------------------------------------------------------------------------


async def test_the_store_talks_tls_with_the_right_certificates(tls_etcd: SecureEtcd) -> None:
    settings = tls_etcd.settings("/tls-store")
    async with open_store(settings, settings.endpoints, timeout=5, retry_attempts=1) as store:
        revision = await store.put("/tls-store/a", b"over TLS")
        assert (await store.get("/tls-store/a")) is not None
        watch = store.watch(b"/tls-store/", range_end(b"/tls-store/"), start_revision=revision)
        batch = await anext(watch)
        await watch.aclose()
    assert [event.kv.value for event in batch.events] == [b"over TLS"]


async def test_a_server_name_replaces_the_endpoints_host_in_the_check(tls_etcd: SecureEtcd) -> None:
    tls = tls_etcd.tls_settings().model_copy(update={"server_name": "etcd.test"})  # a name the certificate has
    good = tls_etcd.settings("/tls-name", tls=tls)
    async with open_store(good, good.endpoints, timeout=5, retry_attempts=1) as store:
        assert await store.ping() > 0

    wrong = tls_etcd.settings("/tls-name", tls=tls.model_copy(update={"server_name": "etcd.elsewhere"}))
    async with open_store(wrong, wrong.endpoints, timeout=5, retry_attempts=1) as store:
        with pytest.raises(StoreUnavailableError) as refused:
            await store.ping()
    assert "the TLS handshake failed: etcd's certificate is not issued to etcd.tls.server_name etcd.elsewhere" in (
        str(refused.value)
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no client certificate", "the TLS handshake failed: etcd refused this client's certificate, or wants one"),
        ("another CA", "the TLS handshake failed: etcd's certificate is not signed by a CA in etcd.tls.ca_file"),
        ("plain text", "Socket closed); if etcd serves TLS, set etcd.tls.ca_file"),
    ],
)
async def test_etcd_refuses_the_wrong_certificates_and_the_error_says_which(
    tls_etcd: SecureEtcd, tmp_path: Path, case: str, message: str
) -> None:
    if case == "no client certificate":
        settings = tls_etcd.settings("/tls-refused", tls=tls_etcd.tls_settings(client_cert=False))
    elif case == "another CA":
        other = Authority(tmp_path / "other", "another CA")
        client = other.issue("stranger", server=False)
        tls = EtcdTlsSettings(ca_file=str(other.cert), cert_file=str(client.cert), key_file=str(client.key))
        settings = tls_etcd.settings("/tls-refused", tls=tls)
    else:
        settings = EtcdSettings(endpoints=[tls_etcd.endpoint])
    async with open_store(settings, settings.endpoints, timeout=5, retry_attempts=1) as store:
        with pytest.raises(StoreUnavailableError) as refused:
            await store.put("/tls-refused/x", b"never")
    assert f"etcd at {tls_etcd.endpoint} is unavailable: " in str(refused.value)
    assert message in str(refused.value)


def test_unusable_tls_files_are_named_before_anything_connects(tls_etcd: SecureEtcd, tmp_path: Path) -> None:
    good = tls_etcd.tls_settings()
    assert tls_etcd.pki is not None
    other_key = tls_etcd.pki.issue("someone-else", server=False).key
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(Path(str(good.key_file)).read_bytes(), None)
    encryption = serialization.BestAvailableEncryption(b"passphrase")
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    cases = {
        "ca_file": (tmp_path / "absent.crt", f"etcd.tls.ca_file: cannot read {tmp_path / 'absent.crt'}: no such file"),
        "cert_file": (tmp_path / "garbage.pem", f"etcd.tls.cert_file {tmp_path / 'garbage.pem'} holds no PEM cert"),
        "key_file": (other_key, f"etcd.tls.key_file {other_key} is not the key of the certificate in etcd.tls.cert"),
    }
    for field, (path, message) in cases.items():
        settings = tls_etcd.settings("/tls-files", tls=good.model_copy(update={field: str(path)}))
        with pytest.raises(CredentialsError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
            open_store(settings, settings.endpoints, timeout=5, retry_attempts=1)
    settings = tls_etcd.settings("/tls-files", tls=good.model_copy(update={"key_file": str(encrypted)}))
    with pytest.raises(CredentialsError, match="is encrypted: gRPC needs the key unencrypted"):
        open_store(settings, settings.endpoints, timeout=5, retry_attempts=1)


async def test_the_daemon_works_over_tls_with_client_certificates(
    tls_etcd: SecureEtcd, tmp_path: Path, root_of: Any
) -> None:
    prefix = f"/tls-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "root"
    root.mkdir()
    settings = make_settings(tls_etcd, prefix, root)
    settings = settings.model_copy(update={"etcd": tls_etcd.settings(prefix)})
    h = Harness(store=await root_of(tls_etcd), keys=KeySpace(prefix), root=root, settings=settings)
    await h.start()
    try:
        await converge(h, "motd", "over TLS\n")
        await converge(h, "motd", "and again\n")
    finally:
        assert await h.stop() == 0


def test_the_daemon_with_another_ca_says_why_it_waits_and_stops_cleanly(tls_etcd: SecureEtcd, tmp_path: Path) -> None:
    other = Authority(tmp_path / "other", "another CA")
    etcd = tls_etcd.settings("/tls-daemon", tls=tls_etcd.tls_settings().model_copy(update={"ca_file": str(other.cert)}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"etcd": etcd.model_dump(mode="json", exclude_defaults=True),
                                      "http": {"listen": "127.0.0.1:0"}}))  # fmt: skip
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([*SETPOINT, "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b'"etcd.unreachable"' not in log_path.read_bytes():
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    unreachable = [line for line in lines if line.get("event") == "etcd.unreachable"]
    assert "etcd's certificate is not signed by a CA in etcd.tls.ca_file" in unreachable[0]["error"]
    assert not any(line.get("event") == "daemon.ready" for line in lines)


async def test_the_commands_use_the_same_tls_settings(tls_etcd: SecureEtcd, tmp_path: Path) -> None:
    prefix = f"/tls-cli-{uuid.uuid4().hex[:8]}"
    etcd = tls_etcd.settings(prefix).model_dump(mode="json", exclude_defaults=True)
    config = tmp_path / "config.yaml"
    agents = {"file": {"allowed_roots": [str(tmp_path)]}}
    config.write_text(yaml.safe_dump({"etcd": etcd, "agents": agents}))
    resources = tmp_path / "resources.yaml"
    resources.write_text(f"kind: file\nname: motd\nspec: {{path: {tmp_path / 'motd'}, content: hi}}\n")

    assert (await cli("apply", "-f", str(resources), "-c", str(config))).stdout == "file/motd applied\n"
    checked = (await cli("check-config", "-c", str(config))).stdout.splitlines()
    assert checked[1] == f"etcd: {tls_etcd.endpoint}: TLS with a client certificate, no user; files read"

    other = Authority(tmp_path / "other", "another CA")
    etcd["tls"]["ca_file"] = str(other.cert)
    config.write_text(yaml.safe_dump({"etcd": etcd, "agents": agents}))
    refused = one_sentence(await cli("apply", "-f", str(resources), "-c", str(config), check=False))
    assert "etcd's certificate is not signed by a CA in etcd.tls.ca_file" in refused

    etcd["tls"]["key_file"] = str(tmp_path / "absent.key")
    config.write_text(yaml.safe_dump({"etcd": etcd, "agents": agents}))
    missing = f"setpoint: etcd.tls.key_file: cannot read {tmp_path / 'absent.key'}: no such file or directory"
    assert one_sentence(await cli("status", "-c", str(config), check=False)) == missing
    assert one_sentence(await cli("check-config", "-c", str(config), check=False)) == missing


async def test_credentials_for_an_etcd_with_authentication_off_are_not_needed(tls_etcd: SecureEtcd) -> None:
    async with EtcdStore(
        [tls_etcd.endpoint], tls=tls_etcd.tls_material(), credentials=Credentials("setpoint", "unused")
    ) as store:
        await store.put("/auth-off/a", b"1")
        watch = store.watch(b"/auth-off/", b"/auth-off0", start_revision=1)
        batch = await anext(watch)
        await watch.aclose()
    assert [event.kv.value for event in batch.events] == [b"1"]


# --- authentication with expiring JWT tokens, and the README's roles ----------------------------------------


async def test_the_daemon_keeps_working_across_token_expiry_and_an_etcd_restart(
    jwt_etcd: SecureEtcd, tmp_path: Path, root_of: Any
) -> None:
    team = Team(jwt_etcd, tmp_path)
    h = await harness_for(team, await root_of(jwt_etcd), tmp_path)
    await h.start()
    try:
        # Each change waits out more than a token's life first; only the watch tells the daemon of it in time
        # (the resync is 30 s away), so each convergence shows the watch still delivering.
        for round_ in range(4):
            await asyncio.sleep(TOKEN_TTL_SECONDS + 0.5)
            await converge(h, "motd", f"round {round_}\n")
        # Any change to users or roles makes etcd refuse every token issued before it ("revision of auth store
        # is old"), a live watch's included when it is re-created.
        await asyncio.to_thread(jwt_etcd.etcdctl, "role", "add", unique("unrelated"))
        await converge(h, "motd", "after a change of roles\n")
        await asyncio.to_thread(jwt_etcd.stop)  # the watch breaks; it is re-created with a later token
        await jwt_etcd.astart()
        await asyncio.sleep(TOKEN_TTL_SECONDS + 0.5)
        await converge(h, "motd", "after the restart\n")
        await converge(h, "other", "a new resource\n")
    finally:
        assert await h.stop() == 0


async def test_a_token_is_renewed_before_it_expires_so_a_watch_opened_later_is_accepted(
    jwt_etcd: SecureEtcd,
) -> None:
    async with jwt_etcd.store() as store:
        revision = await store.put("/jwt-ahead/a", b"1")
        # No request meanwhile: only the renewal ahead of time gives the watch a live token (a dead one would have
        # the watch cancelled as "permission denied" and the first attempt fail with StoreUnavailableError).
        await asyncio.sleep(TOKEN_TTL_SECONDS + 1)
        watch = store.watch(b"/jwt-ahead/", b"/jwt-ahead0", start_revision=revision)
        batch = await anext(watch)
        await watch.aclose()

    assert [event.kv.value for event in batch.events] == [b"1"]


async def test_the_daemon_role_does_its_job_and_nothing_else(jwt_etcd: SecureEtcd, tmp_path: Path) -> None:
    team = Team(jwt_etcd, tmp_path)
    etcd = team.etcd_settings()
    desired = team.keys.desired(Harness.daemon_key("motd"))
    async with open_store(etcd, etcd.endpoints, timeout=5, retry_attempts=1) as daemon:
        await daemon.put(team.keys.status(Harness.daemon_key("motd")), b"{}")
        await daemon.put(team.keys.plan("p-1"), b"{}")
        await daemon.put(team.keys.actual(Harness.daemon_key("motd")), b"{}")
        await daemon.put(f"{team.prefix}/leader", b"me")
        await daemon.put(f"{team.prefix}/members/me", b"{}")
        assert await daemon.get(desired) is None
        start = team.keys.section(Section.ACTUAL).encode()
        kvs, _ = await daemon.range(start, range_end(team.keys.section(Section.ISSUES).encode()))
        assert len(kvs) == 1  # actual/file/motd: the one range the reflector lists and watches

        with pytest.raises(StoreAccessError) as refused:
            await daemon.put(desired, b"{}")
        assert str(refused.value) == (
            f"etcd user {team.daemon_user!r} is not permitted to write {desired} (etcdserver: permission denied): "
            f"grant it to the user's role (README: Securing etcd)"
        )
        with pytest.raises(StoreAccessError, match="is not permitted to read /elsewhere"):
            await daemon.get("/elsewhere")
        with pytest.raises(StoreAccessError, match="is not permitted to watch /elsewhere/ to /elsewhere0"):
            await anext(daemon.watch(b"/elsewhere/", b"/elsewhere0", start_revision=1))

    operator = team.etcd_settings(team.operator_user, team.operator_password)
    async with open_store(operator, operator.endpoints, timeout=5, retry_attempts=1) as store:
        await store.put(desired, b"{}")
        with pytest.raises(StoreAccessError, match=f"etcd user {team.operator_user!r} is not permitted to write"):
            await store.put(team.keys.status(Harness.daemon_key("motd")), b"{}")


async def test_operators_apply_and_approve_with_their_role(
    jwt_etcd: SecureEtcd, tmp_path: Path, root_of: Any
) -> None:
    team = Team(jwt_etcd, tmp_path)
    h = await harness_for(team, await root_of(jwt_etcd), tmp_path)
    config = team.config(tmp_path, team.operator_user, team.operator_password)
    resources = tmp_path / "resources.yaml"
    resources.write_text(f"kind: file\nname: gone\nspec: {{path: {h.root / 'gone'}, content: \"bye\\n\"}}\n")
    await h.start()
    try:
        assert (await cli("apply", "-f", str(resources), "-c", str(config))).stdout == "file/gone applied\n"
        await h.wait_status("gone", "Converged", timeout=15)
        await cli("delete", "file/gone", "-c", str(config))  # a deletion waits for a person by default
        status = await h.wait_status("gone", "AwaitingApproval", timeout=15)
        listed = (await cli("status", "-c", str(config))).stdout
        assert f"setpoint approve {status['plan_id']}" in listed

        approved = await cli("approve", status["plan_id"], "--by", "alice", "-c", str(config))

        assert "approved by alice" in approved.stdout

        async def deleted() -> bool:
            return not (h.root / "gone").exists() and await h.status("gone") is None

        await eventually(deleted, timeout=15, what="the approved deletion to run and the approval to be consumed")
        assert (await h.store.get(team.keys.approval(status["plan_id"]))) is None

        await cli("apply", "-f", str(resources), "-c", str(config))
        reported = await cli("issues", "report", "file/gone", "--summary", "broken", "--id", "i1", "-c", str(config))
        assert "reported issue i1 on file/gone" in reported.stdout
        await cli("issues", "resolve", "file/gone", "i1", "-c", str(config))
    finally:
        assert await h.stop() == 0


async def test_a_wrong_password_is_one_sentence_for_the_commands_and_stops_the_daemon(
    jwt_etcd: SecureEtcd, tmp_path: Path
) -> None:
    team = Team(jwt_etcd, tmp_path)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("guess\n")
    config = team.config(tmp_path, team.operator_user, wrong)

    said = one_sentence(await cli("status", "-c", str(config), check=False))

    assert said == (
        f"setpoint: etcd at {jwt_etcd.endpoint} refused etcd user {team.operator_user!r}: wrong user name or "
        f"password (etcd.username, etcd.password_file or etcd.password_env)"
    )
    settings = Settings(etcd=team.etcd_settings(team.daemon_user, wrong), http=LOOPBACK_HTTP)
    with pytest.raises(StartupError, match=f"refused etcd user {team.daemon_user!r}: wrong user name or password"):
        await Daemon(settings).run(asyncio.Event())
    missing = Settings(etcd=team.etcd_settings(team.daemon_user, tmp_path / "absent"), http=LOOPBACK_HTTP)
    with pytest.raises(StartupError, match=f"etcd password: cannot read secret file {tmp_path / 'absent'}"):
        await Daemon(missing).run(asyncio.Event())


async def test_a_daemon_user_without_a_role_stops_at_start_saying_what_it_may_not_read(
    jwt_etcd: SecureEtcd, tmp_path: Path
) -> None:
    team = Team(jwt_etcd, tmp_path)
    nobody = unique("nobody")
    jwt_etcd.add_user(nobody, "daemon-password")
    settings = Settings(etcd=team.etcd_settings(nobody), http=LOOPBACK_HTTP)

    with pytest.raises(StartupError) as refused:
        await Daemon(settings).run(asyncio.Event())

    assert str(refused.value).startswith(
        f"etcd user {nobody!r} is not permitted to read {team.prefix}/desired/ (etcdserver: permission denied)"
    )


async def test_without_a_user_etcd_takes_the_client_certificates_name(jwt_etcd: SecureEtcd, tmp_path: Path) -> None:
    team = Team(jwt_etcd, tmp_path)
    assert jwt_etcd.pki is not None and jwt_etcd.server is not None
    named = jwt_etcd.pki.issue(team.daemon_user, server=False)  # common name: the daemon's user
    tls = EtcdTlsSettings(ca_file=str(jwt_etcd.pki.cert), cert_file=str(named.cert), key_file=str(named.key))
    etcd = jwt_etcd.settings(team.prefix, tls=tls)
    desired = team.keys.desired(Harness.daemon_key("motd"))
    async with open_store(etcd, etcd.endpoints, timeout=5, retry_attempts=1) as store:
        assert await store.get(desired) is None
        await store.put(team.keys.status(Harness.daemon_key("motd")), b"{}")
        with pytest.raises(StoreAccessError) as refused:
            await store.put(desired, b"{}")
    assert str(refused.value).startswith(
        f"the etcd user named by this client's certificate is not permitted to write {desired}"
    )


async def test_one_read_grant_per_section_does_not_cover_the_watch(jwt_etcd: SecureEtcd, tmp_path: Path) -> None:
    """Why the README grants one read range: etcd checks a range read or watch against one contiguous grant."""
    team = Team(jwt_etcd, tmp_path)
    role, user = unique("per-section"), unique("per-section")
    jwt_etcd.etcdctl("role", "add", role)
    for section in ("actual", "approvals", "desired", "issues"):
        jwt_etcd.etcdctl("role", "grant-permission", "--prefix", role, "read", f"{team.prefix}/{section}/")
    jwt_etcd.add_user(user, "daemon-password", role)
    start, end = f"{team.prefix}/actual/".encode(), range_end(f"{team.prefix}/issues/".encode())
    etcd = team.etcd_settings(user)
    async with open_store(etcd, etcd.endpoints, timeout=5, retry_attempts=1) as store:
        assert await store.get(f"{team.prefix}/desired/file/x") is None  # each section alone may be read
        with pytest.raises(StoreAccessError, match="is not permitted to read"):
            await store.range(start, end)
        with pytest.raises(StoreAccessError, match="is not permitted to watch"):
            await anext(store.watch(start, end, start_revision=1))


# --- authentication with simple tokens ----------------------------------------------------------------------


class CountingStore(EtcdStore):
    """An EtcdStore that counts how often it authenticates (to show that renewals are shared)."""

    authentications = 0

    async def _authenticate(self) -> str:
        self.authentications += 1
        return await super()._authenticate()


async def test_requests_after_a_quiet_spell_share_one_new_token(simple_etcd: SecureEtcd) -> None:
    async with CountingStore([simple_etcd.endpoint], credentials=Credentials("root", ROOT_PASSWORD)) as store:
        await store.put("/simple/a", b"1")
        assert store.authentications == 1
        await asyncio.sleep(TOKEN_TTL_SECONDS + 2)  # etcd forgets a simple token unused for its TTL

        values = await asyncio.gather(*(store.get("/simple/a") for _ in range(20)))

        assert [kv.value if kv else None for kv in values] == [b"1"] * 20
        assert store.authentications == 2


async def test_a_watch_created_with_a_forgotten_token_is_refused_once_and_then_works(simple_etcd: SecureEtcd) -> None:
    async with EtcdStore([simple_etcd.endpoint], credentials=Credentials("root", ROOT_PASSWORD)) as store:
        revision = await store.put("/simple-watch/a", b"1")
        await asyncio.sleep(TOKEN_TTL_SECONDS + 2)

        with pytest.raises(StoreUnavailableError, match=r"etcd cancelled the watch: .*permission denied"):
            await anext(store.watch(b"/simple-watch/", b"/simple-watch0", start_revision=revision))
        watch = store.watch(b"/simple-watch/", b"/simple-watch0", start_revision=revision)
        batch = await anext(watch)
        await watch.aclose()

    assert [event.kv.value for event in batch.events] == [b"1"]


async def test_the_daemon_keeps_working_with_simple_tokens_after_quiet_spells_and_a_restart(
    simple_etcd: SecureEtcd, tmp_path: Path, root_of: Any
) -> None:
    team = Team(simple_etcd, tmp_path)
    h = await harness_for(team, await root_of(simple_etcd), tmp_path)
    await h.start()
    try:
        await converge(h, "motd", "first\n")
        await asyncio.sleep(TOKEN_TTL_SECONDS + 2)
        await converge(h, "motd", "after a quiet spell\n")
        # A restarted etcd has forgotten every simple token: requests and the re-created watch need new ones.
        await asyncio.to_thread(simple_etcd.stop)
        await simple_etcd.astart()
        await converge(h, "motd", "after the restart\n")
    finally:
        assert await h.stop() == 0


async def test_a_daemon_user_that_may_not_write_the_leader_key_stops_instead_of_standing_by_for_ever(
    simple_etcd: SecureEtcd, tmp_path: Path, root_of: Any
) -> None:
    team = Team(simple_etcd, tmp_path)
    role = f"setpoint-daemon-{team.prefix[5:]}"
    simple_etcd.etcdctl("role", "revoke-permission", role, f"{team.prefix}/leader")
    h = await harness_for(team, await root_of(simple_etcd), tmp_path)
    with capture_logs() as logs, pytest.raises(AssertionError, match="did not become ready: 1"):  # never standby
        await h.start()
    refused = [entry for entry in logs if entry["event"] == "election.refused"]
    assert refused and f"not permitted to run a transaction on {team.prefix}/leader" in refused[0]["error"]


def test_the_settings_refuse_plain_text_to_another_host_in_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("etcd: {endpoints: ['etcd.example.internal:2379']}\n")

    said = one_sentence(run_cli("status", "-c", str(config), check=False))

    assert said == (
        f"setpoint: settings file {config} line 1: etcd: endpoint etcd.example.internal:2379 is not a loopback "
        f"address and would be sent plain text: set etcd.tls.ca_file (README: Securing etcd), or etcd.insecure: "
        f"true to send plain text anyway"
    )
