"""The auth token keeper (when a token is renewed; concurrent callers share one renewal), and how etcd's and
gRPC's refusals are said.

etcd's side (`Authenticate`) is a function here that hands out numbered tokens and counts its calls; the
tests against a real etcd with expiring tokens are in tests/integration/test_etcd_security.py."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from plans import TemporaryError
from reconciler.etcd_auth import (
    FAILURE_HOLD_SECONDS,
    MIN_RENEW_SECONDS,
    SIMPLE_TOKEN_RENEW_SECONDS,
    Credentials,
    TlsMaterial,
    TokenKeeper,
    asks_new_token,
    handshake_failure,
    jwt_expiry,
    refusal,
    renew_after,
    who,
)


def jwt(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class Etcd:
    """Authenticate's stand-in: token-1, token-2, ... (or `tokens` in turn), each call counted; `gate` holds
    every answer until set; `error` is raised instead. `called` is set on each call."""

    def __init__(self, tokens: list[str] | None = None) -> None:
        self.calls = 0
        self.tokens = tokens
        self.gate = asyncio.Event()
        self.gate.set()
        self.called = asyncio.Event()
        self.error: Exception | None = None

    async def authenticate(self) -> str:
        self.calls += 1
        self.called.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.tokens[self.calls - 1] if self.tokens else f"token-{self.calls}"


def test_a_jwt_says_when_it_expires_and_anything_else_does_not() -> None:
    assert jwt_expiry(jwt({"exp": 1795387184, "revision": 7, "username": "u"})) == 1795387184
    assert jwt_expiry("tbutvZUbGfBTocgm.8") is None  # etcd's simple token
    assert jwt_expiry(jwt({"username": "u"})) is None
    assert jwt_expiry(jwt({"exp": "soon"})) is None
    assert jwt_expiry(jwt({"exp": True})) is None
    assert jwt_expiry(jwt(["exp"])) is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry("a.bm90IGpzb24.c") is None  # "not json"


def test_renewal_comes_after_two_thirds_of_a_jwts_life_and_every_minute_for_a_simple_token() -> None:
    now = 1_000_000.0
    assert renew_after(jwt({"exp": now + 300}), now=now) == pytest.approx(200)
    assert renew_after(jwt({"exp": now + 2}), now=now) == pytest.approx(4 / 3)
    assert renew_after(jwt({"exp": now + 0.3}), now=now) == MIN_RENEW_SECONDS  # no busy loop on a tiny TTL
    # A token that looks expired on arrival says this clock is off: its expiry is not trusted.
    assert renew_after(jwt({"exp": now - 60}), now=now) == SIMPLE_TOKEN_RENEW_SECONDS
    assert renew_after("tbutvZUbGfBTocgm.8", now=now) == SIMPLE_TOKEN_RENEW_SECONDS


def test_credentials_never_show_the_password() -> None:
    assert "hunter2" not in repr(Credentials("setpoint", "hunter2"))
    assert "hunter2" not in str(Credentials("setpoint", "hunter2"))


async def test_the_first_token_is_got_once_for_all_who_ask_at_once() -> None:
    etcd = Etcd()
    keeper = TokenKeeper(etcd.authenticate)
    etcd.gate.clear()

    waiting = [asyncio.ensure_future(keeper.ensure()) for _ in range(20)]
    await asyncio.sleep(0)
    etcd.gate.set()

    assert await asyncio.gather(*waiting) == ["token-1"] * 20
    assert etcd.calls == 1
    assert await keeper.ensure() == "token-1" and etcd.calls == 1


async def test_a_refused_token_is_renewed_once_however_many_calls_hit_the_refusal() -> None:
    etcd = Etcd()
    keeper = TokenKeeper(etcd.authenticate)
    stale = await keeper.ensure()
    etcd.gate.clear()

    renewals = [asyncio.ensure_future(keeper.renew(stale)) for _ in range(20)]
    await asyncio.sleep(0)
    etcd.gate.set()

    assert await asyncio.gather(*renewals) == ["token-2"] * 20
    assert etcd.calls == 2
    # A call that used the old token and is refused after the renewal gets the new one without asking etcd.
    assert await keeper.renew(stale) == "token-2"
    assert etcd.calls == 2
    assert keeper.token == "token-2"


async def test_one_caller_cancelled_does_not_cancel_the_renewal_the_others_wait_for() -> None:
    etcd = Etcd()
    keeper = TokenKeeper(etcd.authenticate)
    etcd.gate.clear()
    impatient = asyncio.ensure_future(keeper.ensure())
    patient = asyncio.ensure_future(keeper.ensure())
    await asyncio.sleep(0)

    impatient.cancel()
    etcd.gate.set()

    assert await patient == "token-1"
    assert impatient.cancelled()


async def test_a_refused_password_is_not_sent_again_for_a_while() -> None:
    now = [100.0]
    etcd = Etcd()
    keeper = TokenKeeper(etcd.authenticate, monotonic=lambda: now[0])
    etcd.error = PermissionError("wrong user name or password")

    for _ in range(5):
        with pytest.raises(PermissionError, match="wrong user name or password"):
            await keeper.ensure()
    assert etcd.calls == 1

    now[0] += FAILURE_HOLD_SECONDS
    etcd.error = None
    assert await keeper.ensure() == "token-2"


async def test_an_etcd_that_does_not_answer_is_asked_again_by_the_next_caller() -> None:
    etcd = Etcd()
    keeper = TokenKeeper(etcd.authenticate)
    etcd.error = TemporaryError("etcd is unavailable")

    for _ in range(3):
        with pytest.raises(TemporaryError):
            await keeper.ensure()

    assert etcd.calls == 3


async def test_the_keeper_renews_a_jwt_before_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reconciler.etcd_auth.MIN_RENEW_SECONDS", 0.01)
    wall = 1_000_000.0
    # Each token lives 0.03 s on the wall clock the keeper is given: renewed after 0.02 s.
    tokens = [jwt({"exp": wall + 0.03, "n": n}) for n in range(10)]
    etcd = Etcd(tokens)
    keeper = TokenKeeper(etcd.authenticate, wall=lambda: wall)
    running = asyncio.create_task(keeper.run())
    try:
        await keeper.ensure()
        async with asyncio.timeout(10):
            while etcd.calls < 4:
                etcd.called.clear()
                await etcd.called.wait()
        assert keeper.token in tokens[2:5]
    finally:
        running.cancel()


async def test_etcd_with_authentication_off_gives_an_empty_token_and_is_asked_again_later() -> None:
    etcd = Etcd(tokens=["", "token-2"])
    keeper = TokenKeeper(etcd.authenticate)

    assert await keeper.ensure() == ""
    assert keeper.token == ""
    # Authentication turned on later: the first refusal ("user name is empty") gets a token.
    assert await keeper.renew("") == "token-2"


def test_the_answers_that_ask_for_a_new_token_are_clientv3s() -> None:
    for details in (
        "etcdserver: invalid auth token",
        "etcdserver: revision of auth store is old",
        "auth: revision in header is old",  # etcd 3.5.1, as a request is applied
        "etcdserver: user name is empty",
    ):
        assert asks_new_token(details), details
    for details in ("etcdserver: permission denied", "etcdserver: authentication failed, invalid user ID or password"):
        assert not asks_new_token(details), details


# What grpcio 1.85 says when the handshake with etcd 3.5.1 fails (seen in tests/integration/test_etcd_security.py).
_PREFIX = "KV.Range failed after 1 attempts: UNAVAILABLE (connections to all backends failing; last error: "


@pytest.mark.parametrize(
    ("text", "tls", "said"),
    [
        (
            _PREFIX + "UNKNOWN: ipv4:127.0.0.1:57419: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
            "certificate: OK)",
            TlsMaterial(b"ca"),
            "the TLS handshake failed: etcd's certificate is not signed by a CA in etcd.tls.ca_file "
            "(CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate)",
        ),
        (
            _PREFIX + "UNKNOWN: ipv4:127.0.0.1:57419: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
            "error:10000412:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE: OK)",
            TlsMaterial(b"ca"),
            "the TLS handshake failed: etcd refused this client's certificate, or wants one (etcd.tls.cert_file, "
            "etcd.tls.key_file) (SSLV3_ALERT_BAD_CERTIFICATE)",
        ),
        (
            _PREFIX + "UNKNOWN: ipv4:127.0.0.1:49761: Custom verification check failed with error: UNAUTHENTICATED: "
            "Hostname Verification Check failed.)",
            TlsMaterial(b"ca", server_name="etcd.elsewhere"),
            "the TLS handshake failed: etcd's certificate is not issued to etcd.tls.server_name etcd.elsewhere "
            "(etcd.tls.server_name names the name to expect)",
        ),
        (
            _PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:49761: Socket closed)",
            None,
            _PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:49761: Socket closed); if etcd serves TLS, set etcd.tls.ca_file",
        ),
        (_PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:49761: Connection refused)", None, None),
        # A member that died under an open call: its stream is removed, which says nothing about TLS.
        ("KV.Put failed after 1 attempts: UNAVAILABLE (Stream removed (Socket closed))", None, None),
        (_PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:49761: Socket closed)", TlsMaterial(b"ca"), None),
    ],
)
def test_a_failed_handshake_is_said_in_words(text: str, tls: TlsMaterial | None, said: str | None) -> None:
    assert handshake_failure(text, tls) == said


def test_refusals_say_what_to_fix() -> None:
    user = who(Credentials("setpoint"), None)
    assert refusal("etcdserver: permission denied", what="write /s/desired/x", user=user, where="e:2379",
                   credentials=True) == (
        "etcd user 'setpoint' is not permitted to write /s/desired/x (etcdserver: permission denied): grant it to "
        "the user's role (README: Securing etcd)"
    )  # fmt: skip
    assert refusal("invalid user ID or password", what="", user=user, where="e:2379", credentials=True) == (
        "etcd at e:2379 refused etcd user 'setpoint': wrong user name or password (etcd.username, "
        "etcd.password_file or etcd.password_env)"
    )
    anonymous = who(None, None)
    assert refusal("etcdserver: user name is empty", what="read /s/x", user=anonymous, where="e:2379",
                   credentials=False) == (
        "etcd at e:2379 requires authentication (etcdserver: user name is empty): set etcd.username and "
        "etcd.password_file or etcd.password_env"
    )  # fmt: skip
    assert who(None, TlsMaterial(b"ca", cert_chain=b"c", cert_key=b"k")) == (
        "the etcd user named by this client's certificate"
    )
