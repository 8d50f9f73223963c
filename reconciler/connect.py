"""How the daemon and the CLI reach etcd: one place turns the `etcd` settings into a client.

The endpoints come from the caller (the daemon's embedded etcd, or the CLI's
endpoint file, stand in when `etcd.endpoints` is empty). The files the
settings name (CA, client certificate and key, password) are read here, once,
when the client is built: a missing or unusable one is a `CredentialsError`
naming the setting and the file, which the daemon reports as a start-up error
and the CLI as its one-sentence error. Nothing here talks to etcd; whether the
certificates and the password are accepted is found on the first request.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from policies.hooks import read_secret
from reconciler.etcd_auth import Credentials, TlsMaterial
from reconciler.settings import EtcdSettings
from reconciler.store import EtcdStore


class CredentialsError(ValueError):
    """A file or variable the `etcd` settings name cannot be used; the message names the setting and where."""


@dataclass(frozen=True, slots=True)
class Secured:
    """What the `etcd` settings ask for, read from their files: TLS material and credentials, each or none."""

    tls: TlsMaterial | None
    credentials: Credentials | None

    def describe(self) -> str:
        """One line for `check-config`: how the client will talk to etcd."""
        if self.tls is None:
            tls = "plain text"
        elif self.tls.cert_chain is None:
            tls = "TLS"
        else:
            tls = "TLS with a client certificate"
        user = f", user {self.credentials.username}" if self.credentials is not None else ", no user"
        return tls + user


def read_secured(etcd: EtcdSettings) -> Secured:
    """Read every file and variable the `etcd` settings name; raises CredentialsError naming the first bad one."""
    return Secured(tls=_read_tls(etcd), credentials=_read_credentials(etcd))


def open_store(etcd: EtcdSettings, endpoints: Sequence[str], *, timeout: float, retry_attempts: int) -> EtcdStore:
    """A client for `endpoints` configured by `etcd`; `timeout` bounds one request, retries included.
    Raises CredentialsError when a file or variable the settings name cannot be used."""
    secured = read_secured(etcd)
    return EtcdStore(
        endpoints, timeout=timeout, retry_attempts=retry_attempts, tls=secured.tls, credentials=secured.credentials
    )


def _read_credentials(etcd: EtcdSettings) -> Credentials | None:
    if etcd.username is None:
        return None
    try:
        password = read_secret(env=etcd.password_env, file=etcd.password_file, what="etcd password")
    except ValueError as e:
        raise CredentialsError(str(e)) from None
    assert password is not None  # the settings require one of the two with a username
    return Credentials(username=etcd.username, password=password.decode("utf-8"))


class _Encrypted(Exception):
    pass


def _refuse_passphrase() -> str:
    raise _Encrypted


def _read_tls(etcd: EtcdSettings) -> TlsMaterial | None:
    """The PEM files, each checked with the ssl module (which gRPC's own errors would only hint at on connect)."""
    tls = etcd.tls
    if tls.ca_file is None:
        return None
    ca = _read("etcd.tls.ca_file", tls.ca_file)
    _certificates("etcd.tls.ca_file", tls.ca_file)
    if tls.cert_file is None or tls.key_file is None:
        return TlsMaterial(ca_cert=ca, server_name=tls.server_name)
    chain = _read("etcd.tls.cert_file", tls.cert_file)
    key = _read("etcd.tls.key_file", tls.key_file)
    _certificates("etcd.tls.cert_file", tls.cert_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_refuse_passphrase)
    except _Encrypted:
        raise CredentialsError(
            f"etcd.tls.key_file {tls.key_file} is encrypted: gRPC needs the key unencrypted (protect the file by its "
            f"permissions instead)"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CredentialsError(
                f"etcd.tls.key_file {tls.key_file} is not the key of the certificate in etcd.tls.cert_file "
                f"{tls.cert_file}"
            ) from None
        raise CredentialsError(f"etcd.tls.key_file {tls.key_file} holds no PEM private key") from None
    return TlsMaterial(ca_cert=ca, cert_chain=chain, cert_key=key, server_name=tls.server_name)


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise CredentialsError(f"{setting}: cannot read {path}: {reason}") from None


def _certificates(setting: str, path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise CredentialsError(f"{setting} {path} holds no PEM certificate") from None
