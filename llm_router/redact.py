"""Secrets out of everything sent to a model: by key in structured values, by shape in text.

Two passes, both returning new values (nothing is scrubbed in place):

- `value(v)` walks a JSON value. A dict entry whose key matches one of the
  key globs (`fnmatch` style, case-insensitive; `llm.redact_keys`, which
  defaults to `DEFAULT_REDACT_KEYS`) has its whole value replaced by
  "[REDACTED]", whatever it was; every other string goes through `text`.
- `text(s)` replaces, each with "[REDACTED]":

  | what                                   | example of what is caught                                   |
  |----------------------------------------|-------------------------------------------------------------|
  | the literals (the API keys read)        | exactly those strings, 8 characters or longer              |
  | private key blocks                     | -----BEGIN (RSA/EC/OPENSSH/...) PRIVATE KEY----- ... -----END   |
  | passwords in URLs                      | scheme://user:PASS@host -> scheme://user:[REDACTED]@host     |
  | Bearer and Basic credentials           | Authorization: Bearer abc.def (a lower-case word is left)    |
  | JWTs                                   | eyJ...eyJ...signature                                        |
  | AWS access key ids                     | AKIA / ASIA + 16 upper-case letters or digits                |
  | GitHub tokens                          | ghp_ gho_ ghu_ ghs_ ghr_ + 36 or more, github_pat_...        |
  | Slack tokens                           | xoxa- xoxb- xoxp- xoxr- xoxs- ..., xapp-...                  |
  | OpenAI and Anthropic keys              | sk-..., sk-proj-..., sk-ant-... (20 or more after sk-)       |
  | Google API keys                        | AIza + 35                                                    |
  | assignments to secret-sounding names   | password=..., db_passwd: ..., "api_key": "...",              |
  |                                        | aws_secret_access_key = ..., client_secret: '...' (the key   |
  |                                        | is kept, the value goes; a quoted value goes whole)          |

Literals go first, so a configured key is caught even when it has none of
these shapes. Every pattern has bounded quantifiers and no nested
repetition, so the time taken is linear in the length of the text (some ten
milliseconds for 64 KiB, whatever the content): text from etcd, issues and
tool outputs is attacker-controlled, and a regex that backtracks
catastrophically would be a denial of service. The price of the bounds is
that a secret longer than a pattern's bound is redacted only up to it;
no real token comes near them.

The patterns err towards redacting: "max_tokens: 2048" loses its number.
A model plans no worse without a value that looked like a secret.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from pydantic import JsonValue

from llm_router.config import DEFAULT_REDACT_KEYS

REDACTED = "[REDACTED]"
MIN_LITERAL = 8  # shorter "keys" (a local server's "EMPTY") are no secret and would mangle ordinary words

# Where a token may start: not inside a run of token characters, so no run is scanned from more than one start.
_START = r"(?<![A-Za-z0-9_-])"
# The body stops at the first "--": the END line, or the next BEGIN when a key was cut short.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[^-]|-(?!-)){0,16384}+"
    r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?"
)
_URL_PASSWORD = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]{0,30}://[^\s:/@]{0,256}+:)[^\s@/]{1,256}+(?=@)")
_AUTH_SCHEME = re.compile(r"(?i)\b(Bearer|Basic)(\s{1,5})([A-Za-z0-9._~+/=-]{8,4096}+)")
_SHAPES = re.compile(
    _START
    + "(?:"
    + "|".join(
        (
            r"eyJ[A-Za-z0-9_-]{5,4096}+\.eyJ[A-Za-z0-9_-]{5,4096}+\.[A-Za-z0-9_-]{0,4096}+",  # JWT
            r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",  # AWS access key id
            r"gh[pousr]_[A-Za-z0-9]{36,255}+",  # GitHub token
            r"github_pat_[A-Za-z0-9_]{22,255}+",  # GitHub fine-grained token
            r"xox[abprs]-[A-Za-z0-9-]{10,250}+",  # Slack token
            r"xapp-[A-Za-z0-9-]{10,250}+",  # Slack app token
            r"sk-[A-Za-z0-9_-]{20,256}+",  # OpenAI / Anthropic key
            r"AIza[0-9A-Za-z_-]{35}",  # Google API key
        )
    )
    + ")"
)
_SECRET_NAME = r"(?:password|passwd|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)"
_ASSIGNMENT = re.compile(
    rf"(?i)({_SECRET_NAME}[A-Za-z0-9_.-]{{0,40}}[\"']?\s{{0,5}}[:=]\s{{0,5}})"
    r"(\"[^\"\n]{0,512}+\"|'[^'\n]{0,512}+'|[^\s\"',;&]{1,512}+)"
)


def _auth_scheme(match: re.Match[str]) -> str:
    credential = match.group(3)
    if credential.isalpha() and credential.islower():
        return match.group(0)  # prose ("Basic authentication"), not a credential
    return f"{match.group(1)}{match.group(2)}{REDACTED}"


def _assignment(match: re.Match[str]) -> str:
    value = match.group(2)
    if value[:1] in ("'", '"'):
        return f"{match.group(1)}{value[0]}{REDACTED}{value[0]}"
    return f"{match.group(1)}{REDACTED}"


class Redactor:
    """Replaces secrets with "[REDACTED]". Defaults: `DEFAULT_REDACT_KEYS`, no literals."""

    def __init__(self, key_patterns: Sequence[str] = DEFAULT_REDACT_KEYS, literals: Iterable[str] = ()) -> None:
        self.key_patterns = tuple(key_patterns)
        # Longest first, so a key that contains another configured key is replaced whole.
        self.literals = tuple(sorted({s for s in literals if len(s) >= MIN_LITERAL}, key=len, reverse=True))
        translated = "|".join(f"(?:{fnmatch.translate(pattern.lower())})" for pattern in self.key_patterns)
        self._keys = re.compile(translated) if translated else None

    def with_literals(self, literals: Iterable[str]) -> Redactor:
        """A redactor with the same key patterns that also replaces `literals` (API keys read at start-up)."""
        return Redactor(self.key_patterns, (*self.literals, *literals))

    def secret_key(self, key: str) -> bool:
        """Does `key` match one of the key globs (case-insensitive)?"""
        return self._keys is not None and self._keys.match(key.lower()) is not None

    def value(self, v: JsonValue) -> JsonValue:
        """`v` with the values under secret keys replaced and every string passed through `text`."""
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: REDACTED if self.secret_key(k) else self.value(item) for k, item in v.items()}
        if isinstance(v, list):
            return [self.value(item) for item in v]
        return v

    def text(self, s: str) -> str:
        """`s` with the literals and every secret shape in the module's table replaced."""
        for literal in self.literals:
            s = s.replace(literal, REDACTED)
        s = _PRIVATE_KEY.sub(REDACTED, s)
        s = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}", s)
        s = _AUTH_SCHEME.sub(_auth_scheme, s)
        s = _SHAPES.sub(REDACTED, s)
        return _ASSIGNMENT.sub(_assignment, s)
