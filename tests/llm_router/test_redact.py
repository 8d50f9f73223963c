"""Redaction: a canary secret of every listed format, in text and in JSON values, never survives.

Each canary is built at run time from pieces, so no scanner mistakes this
file for a leak. The tests also pin what must survive (ordinary prose, the
non-secret parts of URLs and assignments), and that adversarial 64 KiB
inputs finish (the patterns are bounded; pytest-timeout is the guard
against catastrophic backtracking, not a performance measurement).
"""

from __future__ import annotations

import json

import pytest
from pydantic import JsonValue

from llm_router.config import DEFAULT_REDACT_KEYS
from llm_router.redact import REDACTED, Redactor

A36 = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # 36 characters
B64 = "MIIEowIBAAKCAQEAx4ZcYw9Jd0Qk8Xq2lVb7"

CANARIES: dict[str, tuple[str, str]] = {
    # name: (text containing the secret, the secret itself)
    "aws access key id": ("key=" + "AKIA" + "IOSFODNN7CANARY1" + " in use", "AKIA" + "IOSFODNN7CANARY1"),
    "aws sts key id": ("id ASIA" + "Q3EGUZ7CANARY222 ok", "ASIA" + "Q3EGUZ7CANARY222"),
    "aws secret": ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "CANARY3", "wJalrXUtnFEMI/K7MDENG"),
    "github ghp": ("token ghp" + "_" + A36 + " pushed", "ghp_" + A36),
    "github gho": ("gho" + "_" + A36, "gho_" + A36),
    "github ghu": ("(ghu" + "_" + A36 + ")", "ghu_" + A36),
    "github ghs": ("ghs" + "_" + A36 + ".", "ghs_" + A36),
    "github ghr": ("ghr" + "_" + A36, "ghr_" + A36),
    "github pat": ("use github" + "_pat_11ABCDEFG0123456789_canaryCANARYcanary4", "11ABCDEFG0123456789_canary"),
    "slack bot": ("xox" + "b-123456789012-1234567890123-canaryCANARY5", "canaryCANARY5"),
    "slack user": ("xox" + "p-123456789012-canaryCANARY6", "canaryCANARY6"),
    "bearer": ("Authorization: Bearer eyCanary7.abc-def_ghi", "eyCanary7.abc-def_ghi"),
    "basic": ("Authorization: Basic " + "dXNlcjpjYW5hcnk4", "dXNlcjpjYW5hcnk4"),
    "private key": (
        "cert:\n-----BEGIN RSA PRIVATE KEY-----\n" + B64 + "\nCANARY9abc\n-----END RSA PRIVATE KEY-----\ndone",
        "CANARY9abc",
    ),
    "openssh key, escaped newlines": (
        "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXk" + "CANARY10\\n-----END OPENSSH PRIVATE KEY-----",
        "CANARY10",
    ),
    "cut-short private key": ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI" + "CANARY11", "CANARY11"),
    "url password": ("postgres://admin:canary12pass@db.internal:5432/app", "canary12pass"),
    "openai key": ("OPENAI=sk-" + "proj-canary13ABCDEFGHIJKLMNOPqrst", "canary13ABCDEF"),
    "anthropic key": ("sk-" + "ant-api03-canary14ABCDEFGHIJKLMNOP-xyz", "canary14ABCDEF"),
    "google key": ("key AIza" + "SyCanary15abcdefghijklmnopqrstuvwxy", "SyCanary15"),
    "jwt": (
        "session eyJ" + "hbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkxNiJ9.canary16SignatureXYZ",
        "canary16Signature",
    ),
    "password assignment": ("connect with password=canary17! now", "canary17"),
    "secret colon": ("client_secret: canary18value", "canary18value"),
    "quoted json secret": ('{"db_password": "canary 19 with spaces"}', "canary 19"),
    "single-quoted passwd": ("passwd: 'canary20'", "canary20"),
    "api key assignment": ("API_KEY=canary21value", "canary21value"),
}


@pytest.mark.parametrize("text,secret", list(CANARIES.values()), ids=list(CANARIES))
def test_text_redacts_every_listed_format(text: str, secret: str) -> None:
    redacted = Redactor().text(text)
    assert secret not in redacted
    assert REDACTED in redacted


def test_configured_literals_go_whatever_their_shape() -> None:
    key = "custom-Canary22-key"
    redactor = Redactor(literals=[key, "short"])
    assert redactor.text(f"x{key}y and short") == f"x{REDACTED}y and short"  # short "keys" are left alone


def test_with_literals_keeps_the_key_patterns() -> None:
    redactor = Redactor(["*pin*"]).with_literals(["canary23-literal"])
    assert redactor.value({"PIN": "1234", "note": "canary23-literal"}) == {"PIN": REDACTED, "note": REDACTED}


def test_what_is_kept() -> None:
    redactor = Redactor()
    assert redactor.text("postgres://admin:pw@db:5432/app") == f"postgres://admin:{REDACTED}@db:5432/app"
    assert redactor.text("https://example.com:8443/path") == "https://example.com:8443/path"
    assert redactor.text("password = hunter2") == f"password = {REDACTED}"
    assert redactor.text('"secret": "a b"') == f'"secret": "{REDACTED}"'
    assert redactor.text("Basic authentication is off") == "Basic authentication is off"
    assert redactor.text("the disk is full; restart the task-runner") == "the disk is full; restart the task-runner"
    assert redactor.text("-----BEGIN PUBLIC KEY-----\nabc") == "-----BEGIN PUBLIC KEY-----\nabc"


def test_value_redacts_by_key_glob_case_insensitive_and_scrubs_strings() -> None:
    secret = "ghp_" + A36
    value: JsonValue = {
        "spec": {
            "DB_Password": "canary24",
            "apiKey": {"nested": "canary25"},
            "Authorization": "anything",
            "env": [{"name": "X", "value": f"token is {secret}"}],
            "mode": 420,
            "enabled": True,
            "nothing": None,
        }
    }
    redacted = Redactor().value(value)
    dumped = json.dumps(redacted)
    for canary in ("canary24", "canary25", "anything", secret):
        assert canary not in dumped
    assert redacted == {
        "spec": {
            "DB_Password": REDACTED,
            "apiKey": REDACTED,
            "Authorization": REDACTED,
            "env": [{"name": "X", "value": f"token is {REDACTED}"}],
            "mode": 420,
            "enabled": True,
            "nothing": None,
        }
    }


def test_default_key_globs() -> None:
    redactor = Redactor(DEFAULT_REDACT_KEYS)
    secret_keys = ["password", "x_passwd", "client_secret", "auth_token", "api_key", "ApiKey", "x-api-key"]
    secret_keys += ["ssh_private_key", "private-key", "credentials", "authorization", "set-cookie", "session_id"]
    for key in secret_keys:
        assert redactor.secret_key(key), key
    for key in ("path", "mode", "owner", "content", "authorization_url"):
        assert not redactor.secret_key(key), key


def test_no_key_patterns_means_no_key_redaction() -> None:
    assert Redactor([]).value({"password": "x"}) == {"password": "x"}


def test_redaction_is_idempotent() -> None:
    redactor = Redactor()
    once = redactor.text(" ".join(text for text, _ in CANARIES.values()))
    assert redactor.text(once) == once


ADVERSARIAL = {
    "jwt starts": "eyJ-" * 16384,
    "sk starts": "sk-" * 21845,
    "unfinished private keys": "-----BEGIN X PRIVATE KEY-----" * 2260,
    "unclosed quote": 'password:"' + "password:" * 7000,
    "schemes": "a://" * 16384,
    "long url user": ("x://" + "u" * 250 + ":" + "p" * 250 + " ") * 120,
    "bearers": "Bearer " * 9362,
    "one long run": "a" * 65536,
    "long jwt head": "eyJ" + "a" * 65533,
    "long secret names": ("password" + "_" * 40) * 1365,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_64k_inputs_finish(text: str) -> None:
    assert len(text) >= 60_000
    redacted = Redactor(literals=["k" * 40]).text(text)
    assert isinstance(redacted, str)


def test_a_64k_document_full_of_secrets_is_clean() -> None:
    block = "\n".join(text for text, _ in CANARIES.values())
    document = "\n".join([block] * (65536 // len(block) + 1))
    redacted = Redactor().text(document)
    for _, secret in CANARIES.values():
        assert secret not in redacted
