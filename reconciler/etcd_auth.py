"""Who setpoint is to etcd: its TLS material and credentials, the auth token kept live, and what etcd's
refusals mean, in words that say what to fix. `EtcdStore` uses these; nothing here talks to etcd.

**The token.** etcd gives a token for a user name and password (`Authenticate`) and wants it
in the `token` metadata of every request and stream. Tokens expire, and
neither etcd3-py nor aetcd renews them; Go's clientv3 renews one when a call
fails with "invalid auth token" and retries the call. `EtcdStore` does the
same with `renew`, and this keeper also renews ahead of time, so that a stream
opened later (a watch, a lease keepalive) starts with a live token:

- A JWT (`--auth-token jwt,...`) says when it expires: its payload's `exp`
  (read, not verified: etcd checks it). It is renewed after two thirds of
  the lifetime left when it was issued, as measured on this machine's clock.
  A clock so far off that the token looks expired on arrival is not trusted;
  the simple-token period applies, and etcd's refusals do the rest.
- A simple token (etcd's default) does not say. Its life (`--auth-token-ttl`,
  300 s by default) is counted by each member from the token's last use
  there, so one in steady use on one member lasts indefinitely, but after a
  quiet spell, or on the member the client fails over to, it may be gone. It
  is renewed every SIMPLE_TOKEN_RENEW_SECONDS (60 s, a fifth of etcd's
  default): then the token in hand is never older than that, live for any
  TTL of at least a minute, for one bcrypt check and one raft entry a minute.

One renewal runs at a time: a call that finds its token refused waits for
the renewal already under way instead of starting its own, and a token
already replaced is not renewed again. A refused password is remembered for
FAILURE_HOLD_SECONDS, so that every caller hitting it at once costs etcd one
`Authenticate`, not one each.

**Refusals.** etcd and gRPC say what went wrong in texts meant for their
own developers ("Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL:
error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
"etcdserver: permission denied"); `handshake_failure` and `refusal` turn
them into one sentence naming the setting or the permission to change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from plans import TemporaryError

log = structlog.get_logger("setpoint.etcd")

SIMPLE_TOKEN_RENEW_SECONDS = 60.0
JWT_RENEW_AT = 2 / 3  # of the lifetime the token had left when it arrived
MIN_RENEW_SECONDS = 0.5  # a token with less life than this is renewed no sooner: no busy loop on a tiny TTL
RETRY_SECONDS = 1.0  # after a renewal failed because etcd did not answer
FAILURE_HOLD_SECONDS = 5.0  # a refused password is not sent again sooner


# etcd's answers that mean "authenticate again" (clientv3's shouldRefreshToken): the token expired or was
# never accepted, a user or role changed since it was issued, or the request carried none. etcd 3.5.1 says the
# second in two ways: mapped to a gRPC status by the request's first checks, and raw (code UNKNOWN) when the
# check made as the request is applied fails.
RENEW_TOKEN = (
    "invalid auth token",
    "revision of auth store is old",
    "auth: revision in header is old",
    "user name is empty",
)


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes for a TLS channel: the CA that signed etcd's certificates, and optionally a client certificate
    (chain) and its key. `server_name` replaces each endpoint's host when etcd's certificate is verified."""

    ca_cert: bytes
    cert_chain: bytes | None = None
    cert_key: bytes | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """An etcd user and its password."""

    username: str
    password: str = ""

    def __repr__(self) -> str:  # the password never reaches a log line
        return f"Credentials(username={self.username!r})"


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT, read without verifying it; None for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def renew_after(token: str, *, now: float) -> float:
    """Seconds from `now` (Unix time, when `token` arrived) until `token` should be renewed."""
    expiry = jwt_expiry(token)
    if expiry is None or expiry <= now:
        return SIMPLE_TOKEN_RENEW_SECONDS
    return max(MIN_RENEW_SECONDS, (expiry - now) * JWT_RENEW_AT)


class TokenKeeper:
    """Holds the current token. `authenticate` asks etcd for a new one ("" when etcd has auth off)."""

    def __init__(
        self,
        authenticate: Callable[[], Awaitable[str]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._authenticate = authenticate
        self._monotonic = monotonic
        self._wall = wall
        self._token: str | None = None
        self._renew_at = 0.0  # monotonic
        self._renewal: asyncio.Future[str] | None = None
        self._failure: Exception | None = None
        self._failed_at = 0.0
        self._changed = asyncio.Event()

    @property
    def token(self) -> str | None:
        """The token to send: None before the first one, "" when etcd has authentication off."""
        return self._token

    async def ensure(self) -> str:
        """The current token, getting the first one if there is none yet."""
        if self._token is not None:
            return self._token
        return await self.renew(None)

    async def renew(self, stale: str | None) -> str:
        """A token other than `stale`: the current one if it was already replaced, else a new one, shared with
        every caller that asks meanwhile. Raises what `authenticate` raised."""
        if self._token is not None and self._token != stale:
            return self._token
        if self._failure is not None and self._monotonic() - self._failed_at < FAILURE_HOLD_SECONDS:
            raise self._failure
        if self._renewal is None:
            self._renewal = asyncio.ensure_future(self._renew())
            # Its error is raised to every caller; this only keeps asyncio quiet when all of them were cancelled.
            self._renewal.add_done_callback(lambda done: done.cancelled() or done.exception())
        # Shielded: a caller that is cancelled (its own deadline) must not cancel the others' renewal.
        return await asyncio.shield(self._renewal)

    async def _renew(self) -> str:
        try:
            token = await self._authenticate()
        except TemporaryError:
            raise
        except Exception as e:
            self._failure, self._failed_at = e, self._monotonic()
            raise
        finally:
            self._renewal = None
        self._failure = None
        if token == "" and self._token != "":
            log.warning("etcd.auth_not_enabled", advice="etcd takes every request without a user; enable auth")
        self._token = token
        self._renew_at = self._monotonic() + renew_after(token, now=self._wall())
        self._changed.set()
        return token

    async def run(self) -> None:
        """Renew the token ahead of time, for as long as it runs (cancel it to stop). Waits for a first token."""
        while True:
            self._changed.clear()
            wait = None if self._token is None else max(0.0, self._renew_at - self._monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)
                continue  # a new token (or the first): schedule from it
            try:
                await self.renew(self._token)
            except TemporaryError as e:
                log.warning("etcd.token_renewal_failed", error=str(e), retry_in=RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
            except Exception as e:  # the refresher's boundary: calls see the same error and report it
                log.error("etcd.token_renewal_failed", error=str(e), retry_in=FAILURE_HOLD_SECONDS)
                await asyncio.sleep(FAILURE_HOLD_SECONDS)


def asks_new_token(details: str) -> bool:
    """Whether etcd's refusal `details` means the token should be renewed and the request tried again."""
    return any(text in details for text in RENEW_TOKEN)


def who(credentials: Credentials | None, tls: TlsMaterial | None) -> str:
    """Who etcd takes this client for, as an error names it."""
    if credentials is not None:
        return f"etcd user {credentials.username!r}"
    if tls is not None and tls.cert_chain is not None:
        return "the etcd user named by this client's certificate"  # etcd's --client-cert-auth takes its CN
    return "a client without an etcd user"


def refusal(details: str, *, what: str, user: str, where: str, credentials: bool) -> str:
    """The sentence for etcd's refusal `details` of `what` (e.g. "write /setpoint/x") by `user` at `where`."""
    if "permission denied" in details:
        request = f" to {what}" if what else ""
        return f"{user} is not permitted{request} ({details}): grant it to the user's role (README: Securing etcd)"
    if not credentials:
        return (
            f"etcd at {where} requires authentication ({details}): set etcd.username and etcd.password_file or "
            f"etcd.password_env"
        )
    if "invalid user ID or password" in details:
        return (
            f"etcd at {where} refused {user}: wrong user name or password (etcd.username, etcd.password_file or "
            f"etcd.password_env)"
        )
    return f"etcd at {where} refused {user} ({details})"


def handshake_failure(text: str, tls: TlsMaterial | None) -> str | None:
    """Why a connection failed, when gRPC's `text` says the TLS handshake did (or plain text met TLS); else None."""
    if "Hostname Verification Check failed" in text:
        expected = "the endpoint's host" if tls is None or tls.server_name is None else (
            f"etcd.tls.server_name {tls.server_name}"
        )
        return (
            f"the TLS handshake failed: etcd's certificate is not issued to {expected} (etcd.tls.server_name names "
            f"the name to expect)"
        )
    if tls is None and "Socket closed" in text and "Stream removed" not in text:  # not a member that died mid-call
        return f"{text}; if etcd serves TLS, set etcd.tls.ca_file"
    found = re.search(r"OPENSSL_internal:([A-Z0-9_]+)(?::\s*([^:)]+))?", text)
    if "handshake failed" not in text.lower() or found is None:
        return None
    code, detail = found.group(1), (found.group(2) or "").strip()
    reason = f"{code}: {detail}" if detail and detail != "OK" else code
    if code == "CERTIFICATE_VERIFY_FAILED":
        return f"the TLS handshake failed: etcd's certificate is not signed by a CA in etcd.tls.ca_file ({reason})"
    if "CERTIFICATE" in code:  # BAD_CERTIFICATE, CERTIFICATE_REQUIRED, UNKNOWN_CA...: etcd's alert about ours
        return (
            f"the TLS handshake failed: etcd refused this client's certificate, or wants one (etcd.tls.cert_file, "
            f"etcd.tls.key_file) ({reason})"
        )
    return f"the TLS handshake failed ({reason})"
