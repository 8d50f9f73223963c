"""The built-in `http_check` agent: an HTTP health check whose failures are reported as issues on its target.

Desired spec: `url` (http or https, no credentials in it), `method` (GET or
HEAD; default GET), `expect_status` (a list of codes, or a range "200-299";
default "200-399"), `body_contains` (optional text the first `max_body_bytes`
of the body must contain), `timeout_seconds` (default 5), `interval_seconds`
(default 10, at least `agents.http_check.min_interval_seconds`),
`failure_threshold` (default 3) and `target` ("KIND/NAME" of the resource the
check is about).

A check is a `ProbingAgent`, not an `ObservingAgent`: the runtime
(`reconciler/probes.py`) probes it on its own steady schedule, counts
consecutive failures and reports the issue on the target. Observing it on
every reconcile would probe at random moments and count them wrong. So this
agent plans nothing: `reconcile`, `retire` and `heal` return empty plans that
say why, and it offers no tools. The target's agent heals the target.

Decisions: only GET and HEAD, because a probe runs every few seconds without
a plan, a policy or a journal, so it must not change anything; redirects are
not followed (a 3xx is the answer, and the default range accepts it), so a
check never ends up probing a host its spec does not name; each probe opens a
new connection (the session's connector does not keep connections alive), so
a restarted server is not failed on a stale pooled connection and "a client
can connect" is what is checked; at most `max_body_bytes` of a body are read,
and only for `body_contains`. The probe's outcome holds no latency and no body,
only what changes when the outcome does (status, error), so the runtime writes
`actual/` only when the outcome changes. The outcome becomes an issue's
summary, so it is built from our own words, the status code and the OS's
reason for a refused connection; what a broken or hostile server sent is only
in the error (escaped, one line, at most 200 characters), in `details`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agents.base import ProbeResult, ProbeSchedule
from plans import ExecutionPlan, InvalidResourceError, Issue, Resource, ResourceKey, Snapshot, validate_name
from plans.errors import describe_validation_error
from tools import Tool

DEFAULT_EXPECT = "200-399"
MAX_ERROR_CHARS = 200
_RANGE = re.compile(r"\s*([1-5][0-9]{2})\s*(?:-\s*([1-5][0-9]{2})\s*)?")


class HttpCheckSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048)
    method: Literal["GET", "HEAD"] = "GET"
    expect_status: list[int] | str = DEFAULT_EXPECT
    body_contains: str | None = Field(default=None, min_length=1, max_length=1024)
    timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    interval_seconds: float = Field(default=10.0, gt=0, le=86400)
    failure_threshold: int = Field(default=3, ge=1, le=1000)
    target: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError as e:
            raise ValueError(f"{value!r} is not a URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials: the URL is written to actual/ and to issues")
        if any(c.isspace() or ord(c) < 0x20 for c in value):
            raise ValueError("must not contain whitespace or control characters")
        return value

    @field_validator("expect_status")
    @classmethod
    def _expect(cls, value: list[int] | str) -> list[int] | str:
        expected_statuses(value)  # raises ValueError naming what is wrong
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        kind, sep, name = value.partition("/")
        if not sep:
            raise ValueError(f"{value!r} is not of the form KIND/NAME")
        validate_name(kind, what="kind")  # ValueError naming the part that is wrong
        validate_name(name, what="name")
        if kind == "http_check":
            raise ValueError("must name the resource the check is about, not another http_check")
        return value

    @property
    def target_key(self) -> ResourceKey:
        return ResourceKey.parse(self.target)

    @property
    def what(self) -> str:
        return f"{self.method} {self.url}"


def expected_statuses(value: list[int] | str) -> frozenset[int]:
    """The status codes `expect_status` accepts; ValueError saying why it is not a list of codes or a range."""
    if isinstance(value, list):
        if not value:
            raise ValueError("must name at least one status code")
        for code in value:
            if not 100 <= code <= 599:
                raise ValueError(f"{code} is not an HTTP status code (100-599)")
        return frozenset(value)
    match = _RANGE.fullmatch(value)
    if match is None:
        raise ValueError(f'{value!r} is not a status code or a range such as "200-299"')
    low = int(match[1])
    high = int(match[2]) if match[2] is not None else low
    if high < low:
        raise ValueError(f"the range {value!r} is empty (it ends before it begins)")
    return frozenset(range(low, high + 1))


def _spec_error(error: ValidationError) -> str:
    return describe_validation_error(
        error,
        what=None,
        prefix="spec.",
        unknown="is not a known field (expected url, method, expect_status, body_contains, timeout_seconds, "
        "interval_seconds, failure_threshold, target)",
        explain={"literal_error": "must be GET or HEAD (a probe must not change anything)"},
    )


def _cut(text: str) -> str:
    """`text` on one line, printable, at most MAX_ERROR_CHARS."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class HttpCheckAgent:
    name = "http_check"
    kinds = frozenset({"http_check"})

    def __init__(self, *, max_body_bytes: int = 64 * 1024, min_interval_seconds: float = 1.0) -> None:
        self._max_body = max_body_bytes
        self._min_interval = min_interval_seconds

    def tools(self) -> Sequence[Tool]:
        return ()

    def parse(self, desired: Resource) -> HttpCheckSpec:
        """The validated spec, or InvalidResourceError saying (in one sentence) what is wrong."""
        try:
            spec = HttpCheckSpec.model_validate(desired.spec)
        except ValidationError as e:
            raise InvalidResourceError(_spec_error(e)) from None
        if spec.interval_seconds < self._min_interval:
            raise InvalidResourceError(
                f"spec.interval_seconds {spec.interval_seconds:g} is below agents.http_check.min_interval_seconds "
                f"({self._min_interval:g} s)"
            )
        if spec.method == "HEAD" and spec.body_contains is not None:
            raise InvalidResourceError("spec.body_contains cannot be checked with method HEAD: its answer has no body")
        return spec

    def validate(self, desired: Resource) -> None:
        self.parse(desired)

    def schedule(self, desired: Resource) -> ProbeSchedule:
        spec = self.parse(desired)
        return ProbeSchedule(
            target=spec.target_key, interval_seconds=spec.interval_seconds, timeout_seconds=spec.timeout_seconds,
            failure_threshold=spec.failure_threshold, what=spec.what,
            details={"url": spec.url, "method": spec.method},
        )  # fmt: skip

    async def probe(self, desired: Resource, *, session: aiohttp.ClientSession) -> ProbeResult:
        spec = self.parse(desired)
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        try:
            async with session.request(
                spec.method, spec.url, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=spec.timeout_seconds),
            ) as response:  # fmt: skip
                status = response.status
                ok, outcome = self._judge(spec, status)
                if ok and spec.body_contains is not None:
                    ok, outcome = self._judge_body(spec, status, await self._read(response))
        except TimeoutError:
            return self._result(loop, started, status, f"timed out after {spec.timeout_seconds:g} s")
        except aiohttp.ClientConnectorError as e:
            return self._result(loop, started, None, f"could not connect: {e.os_error.strerror or e.os_error}")
        except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as e:
            # What a broken or hostile server sent stays out of the outcome (an issue's summary) and is kept,
            # escaped and cut, only as the error.
            return self._result(loop, started, status, "sent an answer that is not valid HTTP", detail=e)
        except (aiohttp.ClientError, OSError, ValueError) as e:  # a dropped connection, an address aiohttp refuses
            return self._result(loop, started, status, f"failed ({type(e).__name__})", detail=e)
        return ProbeResult(
            ok=ok, outcome=outcome, state={"status": status, "error": None if ok else outcome},
            latency_seconds=loop.time() - started,
        )  # fmt: skip

    @staticmethod
    def _result(
        loop: asyncio.AbstractEventLoop, started: float, status: int | None, outcome: str, *,
        detail: BaseException | None = None,
    ) -> ProbeResult:  # fmt: skip
        outcome = _cut(outcome)
        error = outcome if detail is None else _cut(f"{outcome}: {type(detail).__name__}: {detail!s}")
        return ProbeResult(
            ok=False, outcome=outcome, state={"status": status, "error": error}, latency_seconds=loop.time() - started
        )

    @staticmethod
    def _judge(spec: HttpCheckSpec, status: int) -> tuple[bool, str]:
        if status in expected_statuses(spec.expect_status):
            return True, f"returned {status}"
        return False, f"returned {status}"

    def _judge_body(self, spec: HttpCheckSpec, status: int, body: bytes) -> tuple[bool, str]:
        assert spec.body_contains is not None
        if spec.body_contains.encode("utf-8") in body:
            return True, f"returned {status}"
        return False, f"returned {status} without {_cut(spec.body_contains)!r} in the first {self._max_body} bytes"

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """At most `max_body_bytes` of the body: a hostile endpoint cannot make the daemon read more."""
        chunks: list[bytes] = []
        size = 0
        while size < self._max_body:
            chunk = await response.content.read(self._max_body - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def _reasoning(self, spec: HttpCheckSpec) -> str:
        return (
            f"probes {spec.what} every {spec.interval_seconds:g} s; {spec.failure_threshold} failures in a row "
            f"report an issue on {spec.target} (the latest result is in actual/http_check/)"
        )

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        """Nothing to do: the runtime probes. An empty plan saying what is checked."""
        spec = self.parse(snapshot.desired)
        return snapshot.plan(agent=self.name, reasoning=self._reasoning(spec))

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(
            agent=self.name, reasoning="a check leaves nothing behind: probing stops and its issue is withdrawn"
        )

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        return snapshot.plan(
            agent=self.name,
            reasoning="a check is not healed itself: what it finds is reported on its target, whose agent heals it",
        )

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)
