"""Settings load from YAML with defaults, and every mistake is one sentence naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from reconciler.settings import Settings, SettingsError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None)

    assert settings == Settings()
    assert settings.etcd.endpoints == []
    assert settings.etcd.prefix == "/setpoint"
    assert settings.http.listen == "127.0.0.1:9464"
    assert settings.agents.file.allowed_roots == []
    assert settings.agents.file.poll_seconds == 10
    election = settings.election  # controller-runtime's
    assert (election.lease_seconds, election.renew_seconds, election.retry_seconds) == (15, 10, 2)
    assert election.member_id is None


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "state_dir: state\nagents: {file: {allowed_roots: [files, /abs]}}\n"))

    assert settings.state_dir == str(tmp_path / "state")
    assert settings.agents.file.allowed_roots == [str(tmp_path / "files"), "/abs"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reconciler: {workerz: 2}\n", "reconciler.workerz is not a known setting"),
        ("reconciler: {workers: 0}\n", "reconciler.workers"),
        ("etcd: {endpoints: ['http://etcd:2379']}\n", "is not host:port"),
        ("etcd: {endpoints: ['etcd']}\n", "is not host:port"),
        ("etcd: {prefix: 'setpoint'}\n", "must be an absolute key path"),
        ("http: {listen: 'localhost'}\n", "http.listen"),
        ("reconciler: {backoff_base_seconds: 10, backoff_max_seconds: 1}\n", "backoff_max_seconds"),
        ("reconciler: {max_auto_risk: high}\n", "reconciler.max_auto_risk was removed: set what each risk level"),
        ("limits: {flap_max_plans: 2}\n", "limits moved to the policy file"),
        ("policies: {file: 3}\n", "policies.file"),
        ("approvals: {webhooks: [{url: 'ftp://x'}]}\n", "is not an http:// or https:// URL"),
        ("log: {level: loud}\n", "log.level"),
        ("election: {lease_seconds: 5, renew_seconds: 5}\n", "election: retry_seconds (2) < renew_seconds (5) < "
         "lease_seconds (5) must hold"),
        ("election: {retry_seconds: 12}\n", "retry_seconds (12) < renew_seconds (10)"),
        ("election: {member_id: 'a/b'}\n", "election.member_id"),
        ("- a list\n", "must hold a mapping"),
        ("etcd: [\n", "line 2 column 1: not valid YAML"),
    ],
)
def test_mistakes_are_one_sentence_naming_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(SettingsError) as raised:
        load_settings(path)

    assert str(raised.value).startswith(f"settings file {path}") or "cannot read" in str(raised.value)
    assert message in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "absent.yaml")


def test_ipv6_listen_in_brackets_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "http: {listen: '[::1]:0'}\n"))

    assert settings.http.listen == "[::1]:0"


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _leaves(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_the_reference_config_lists_every_setting() -> None:
    path = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"
    raw = yaml.safe_load(path.read_text())

    missing = []
    for dotted in _leaves(Settings):
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(dotted)
                break
            node = node[part]
    assert missing == [], f"deploy/config.example.yaml lacks {missing}"
    load_settings(path)  # and it is valid


@pytest.mark.parametrize(
    ("etcd", "message"),
    [
        ("{endpoints: ['etcd-1.example:2379']}",
         "endpoint etcd-1.example:2379 is not a loopback address and would be sent plain text: set etcd.tls.ca_file"),
        ("{endpoints: ['127.0.0.1:2379', '10.0.0.7:2379']}", "endpoint 10.0.0.7:2379 is not a loopback address"),
        ("{endpoints: ['[::1]:2379', '[fd00::7]:2379']}", "endpoint [fd00::7]:2379 is not a loopback address"),
        ("{endpoints: ['localhost:2379'], tls: {cert_file: c.crt, key_file: c.key}}", "cert_file needs ca_file"),
        ("{endpoints: ['localhost:2379'], tls: {server_name: etcd.example}}", "server_name needs ca_file"),
        ("{endpoints: ['localhost:2379'], tls: {ca_file: ca.crt, cert_file: c.crt}}",
         "set cert_file and key_file together"),
        ("{endpoints: ['localhost:2379'], tls: {ca_file: ca.crt, key_file: c.key}}",
         "set cert_file and key_file together"),
        ("{endpoints: ['localhost:2379'], username: setpoint}",
         "username 'setpoint' needs its password from password_file or password_env (one)"),
        ("{endpoints: ['localhost:2379'], username: setpoint, password_file: p, password_env: P}",
         "needs its password from password_file or password_env (one)"),
        ("{endpoints: ['localhost:2379'], password_env: P}",
         "a password (password_file or password_env) needs username"),
        ("{tls: {ca_file: ca.crt}}", "tls and username apply to etcd.endpoints"),
        ("{username: setpoint, password_env: P}", "tls and username apply to etcd.endpoints"),
        ("{tls: {ca_file: ca.crt, verify: false}}", "etcd.tls.verify is not a known setting"),
        ("{insecure: maybe}", "etcd.insecure"),
    ],
)  # fmt: skip
def test_etcd_security_mistakes_are_one_sentence(tmp_path: Path, etcd: str, message: str) -> None:
    path = write(tmp_path, f"etcd: {etcd}\n")

    with pytest.raises(SettingsError) as raised:
        load_settings(path)

    assert str(raised.value).startswith(f"settings file {path}")
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "etcd",
    [
        "{endpoints: ['127.0.0.1:2379', '127.8.9.10:2379', 'localhost:2379', 'LOCALHOST:1', '[::1]:2379']}",
        "{endpoints: ['etcd-1.example:2379'], insecure: true}",
        "{endpoints: ['etcd-1.example:2379'], tls: {ca_file: /etc/ca.crt}}",
        "{endpoints: ['etcd-1.example:2379'], tls: {ca_file: /ca, cert_file: /c, key_file: /k, server_name: etcd}}",
        "{endpoints: ['localhost:2379'], username: setpoint, password_env: SETPOINT_ETCD_PASSWORD}",
    ],
)
def test_plain_text_is_allowed_on_loopback_or_when_asked_for(tmp_path: Path, etcd: str) -> None:
    load_settings(write(tmp_path, f"etcd: {etcd}\n"))


def test_etcd_files_are_relative_to_the_settings_file(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            "etcd: {endpoints: ['etcd:2379'], tls: {ca_file: pki/ca.crt, cert_file: pki/c.crt, key_file: /abs/c.key},"
            " username: setpoint, password_file: secret/password}\n",
        )
    )

    assert settings.etcd.tls.ca_file == str(tmp_path / "pki" / "ca.crt")
    assert settings.etcd.tls.cert_file == str(tmp_path / "pki" / "c.crt")
    assert settings.etcd.tls.key_file == "/abs/c.key"
    assert settings.etcd.password_file == str(tmp_path / "secret" / "password")
