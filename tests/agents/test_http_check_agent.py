"""HttpCheckAgent: refuses an invalid spec with one sentence naming the field; probes a real server on loopback
(status, range, body, redirect, hang, refusal, a hostile answer) without ever raising; plans nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from endpoint import Endpoint
from pydantic import JsonValue

from agents import ObservingAgent, ProbingAgent
from agents.builtin.http_check import HttpCheckAgent
from plans import InvalidResourceError, Issue, Observed, Resource, ResourceKey, Snapshot

MAX_BODY = 1024


@pytest.fixture
def agent() -> HttpCheckAgent:
    return HttpCheckAgent(max_body_bytes=MAX_BODY, min_interval_seconds=0.5)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    server = await Endpoint().start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


def check(url: str = "http://127.0.0.1:8080/", **spec: JsonValue) -> Resource:
    return Resource(kind="http_check", name="web", spec={"url": url, "target": "process/web", **spec})


# -- the spec --------------------------------------------------------------------------------------------------------


def test_a_minimal_spec_takes_the_documented_defaults(agent: HttpCheckAgent) -> None:
    schedule = agent.schedule(check())
    assert schedule.target == ResourceKey(kind="process", name="web")
    assert (schedule.interval_seconds, schedule.timeout_seconds, schedule.failure_threshold) == (10.0, 5.0, 3)
    assert schedule.what == "GET http://127.0.0.1:8080/"
    assert dict(schedule.details) == {"url": "http://127.0.0.1:8080/", "method": "GET"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"url": "ftp://host/x"}, "spec.url: 'ftp://host/x' is not an http:// or https:// URL with a host"),
        ({"url": "http:///path"}, "spec.url: 'http:///path' is not an http:// or https:// URL with a host"),
        ({"url": "http://user:pw@host/"}, "spec.url: must not carry credentials"),
        ({"url": "http://host:99999/"}, "spec.url: 'http://host:99999/' is not a URL"),
        ({"method": "POST"}, "spec.method must be GET or HEAD (a probe must not change anything)"),
        ({"expect_status": "299-200"}, "spec.expect_status: the range '299-200' is empty"),
        ({"expect_status": "2xx"}, "spec.expect_status: '2xx' is not a status code or a range"),
        ({"expect_status": [200, 999]}, "spec.expect_status: 999 is not an HTTP status code (100-599)"),
        ({"expect_status": []}, "spec.expect_status: must name at least one status code"),
        ({"target": "web"}, "spec.target: 'web' is not of the form KIND/NAME"),
        ({"target": "process/Web"}, "spec.target: name 'Web' does not match"),
        ({"target": "http_check/other"}, "spec.target: must name the resource the check is about"),
        ({"timeout_seconds": 0}, "spec.timeout_seconds: Input should be greater than 0"),
        ({"failure_threshold": "3"}, "spec.failure_threshold: Input should be a valid integer"),
        ({"interval_seconds": 0.1}, "spec.interval_seconds 0.1 is below agents.http_check.min_interval_seconds"),
        ({"method": "HEAD", "body_contains": "ok"}, "spec.body_contains cannot be checked with method HEAD"),
        ({"headers": {}}, "spec.headers is not a known field (expected url, method, expect_status"),
    ],
)
def test_an_invalid_spec_is_refused_in_one_sentence_naming_the_field(
    agent: HttpCheckAgent, spec: dict[str, JsonValue], message: str
) -> None:
    with pytest.raises(InvalidResourceError) as raised:
        agent.validate(check(**spec))
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_missing_target_is_named() -> None:
    with pytest.raises(InvalidResourceError, match=r"^spec\.target is required$"):
        HttpCheckAgent().validate(Resource(kind="http_check", name="web", spec={"url": "http://h/"}))


# -- probing a real server -------------------------------------------------------------------------------------------


async def test_an_expected_status_passes_and_another_fails_with_what_it_returned(
    agent: HttpCheckAgent, endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    passed = await agent.probe(check(endpoint.url), session=session)
    assert passed.ok and passed.outcome == "returned 200"
    assert dict(passed.state) == {"status": 200, "error": None}
    assert passed.latency_seconds >= 0

    endpoint.answer(500)
    failed = await agent.probe(check(endpoint.url), session=session)
    assert not failed.ok and failed.outcome == "returned 500"
    assert dict(failed.state) == {"status": 500, "error": "returned 500"}

    endpoint.answer(204)
    assert (await agent.probe(check(endpoint.url, expect_status=[204]), session=session)).ok
    assert not (await agent.probe(check(endpoint.url, expect_status="200"), session=session)).ok
    assert (await agent.probe(check(endpoint.url, expect_status="200-299", method="HEAD"), session=session)).ok


async def test_a_redirect_is_the_answer_and_is_not_followed(
    agent: HttpCheckAgent, endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    elsewhere = await Endpoint().start()
    try:
        endpoint.answer(302)
        # aiohttp would follow a Location header: the endpoint's answer names another server.
        endpoint.body = b""
        result = await agent.probe(check(endpoint.url), session=session)
        assert result.ok and result.outcome == "returned 302", "302 is inside the default 200-399"
        assert not (await agent.probe(check(endpoint.url, expect_status="200-299"), session=session)).ok
        assert elsewhere.requests == 0
    finally:
        await elsewhere.stop()


async def test_body_contains_reads_at_most_the_configured_bytes(
    agent: HttpCheckAgent, endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    endpoint.answer(200, b"status: healthy")
    assert (await agent.probe(check(endpoint.url, body_contains="healthy"), session=session)).ok
    missing = await agent.probe(check(endpoint.url, body_contains="ready"), session=session)
    assert not missing.ok
    assert missing.outcome == f"returned 200 without 'ready' in the first {MAX_BODY} bytes"

    endpoint.answer(200, b"x" * MAX_BODY + b"healthy")  # past what is read
    assert not (await agent.probe(check(endpoint.url, body_contains="healthy"), session=session)).ok


async def test_a_hang_past_the_timeout_is_a_failure(
    agent: HttpCheckAgent, endpoint: Endpoint, session: aiohttp.ClientSession
) -> None:
    endpoint.hang()
    result = await asyncio.wait_for(agent.probe(check(endpoint.url, timeout_seconds=0.2), session=session), 10)
    assert not result.ok and result.outcome == "timed out after 0.2 s"
    assert dict(result.state) == {"status": None, "error": "timed out after 0.2 s"}


async def test_a_refused_connection_is_a_failure(agent: HttpCheckAgent, session: aiohttp.ClientSession) -> None:
    endpoint = await Endpoint().start()
    url = endpoint.url
    await endpoint.stop()  # nothing listens on that port now
    result = await agent.probe(check(url), session=session)
    assert not result.ok and result.outcome.startswith("could not connect: "), result.outcome
    assert result.state["status"] is None


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[str]:
    """A TCP server on loopback that answers with whatever `handler` writes; its URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
    await writer.drain()


async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"y" * 4096
    for _ in range(100_000):  # 400 MB, if anyone read it all
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()


async def lying_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    await writer.drain()


@pytest.mark.parametrize(
    ("handler", "spec", "outcome"),
    [
        (garbage, {}, "sent an answer that is not valid HTTP"),
        (huge_header, {}, "sent an answer that is not valid HTTP"),
        (endless_body, {"body_contains": "healthy"}, f"returned 200 without 'healthy' in the first {MAX_BODY} bytes"),
        (lying_length, {"body_contains": "healthy"}, "sent an answer that is not valid HTTP"),
    ],
    ids=["garbage", "huge_header", "endless_body", "lying_length"],
)
async def test_a_hostile_answer_is_a_failure_and_never_raises(
    agent: HttpCheckAgent, session: aiohttp.ClientSession, handler: RawHandler, spec: dict[str, Any], outcome: str
) -> None:
    async with raw_server(handler) as url:
        result = await asyncio.wait_for(agent.probe(check(url, timeout_seconds=5, **spec), session=session), 10)
    assert not result.ok
    assert result.outcome == outcome
    error = result.state["error"]
    assert isinstance(error, str) and error.startswith(outcome)
    assert len(error) <= 200 and error.isprintable() and "NOT HTTP" not in result.outcome


# -- planning --------------------------------------------------------------------------------------------------------


def snapshot(resource: Resource, *, deleted: bool = False) -> Snapshot:
    actual = Observed(kind="http_check", name="web", state={"passing": False}, observed_at=datetime.now(UTC))
    return Snapshot(desired=resource, revision=7, deleted=deleted, actual=actual)


async def test_it_plans_nothing_and_says_why(agent: HttpCheckAgent) -> None:
    resource = check(interval_seconds=2, failure_threshold=4)
    plan = await agent.reconcile(snapshot(resource))
    assert plan.is_empty and plan.desired_revision == 7
    assert plan.reasoning.startswith(
        "probes GET http://127.0.0.1:8080/ every 2 s; 4 failures in a row report an issue on process/web"
    )
    assert (await agent.plan(snapshot(resource))).is_empty
    retired = await agent.retire(snapshot(resource, deleted=True))
    assert retired.is_empty and "probing stops" in retired.reasoning
    healed = await agent.heal(Issue(summary="x", source="test"), snapshot(resource))
    assert healed.is_empty and "not healed itself" in healed.reasoning
    assert list(agent.tools()) == []


async def test_an_invalid_spec_is_invalid_when_reconciled(agent: HttpCheckAgent) -> None:
    with pytest.raises(InvalidResourceError, match=r"^spec\.url: "):
        await agent.reconcile(snapshot(check("nope")))


def test_it_is_probed_by_the_runtime_not_observed_on_reconcile(agent: HttpCheckAgent) -> None:
    assert isinstance(agent, ProbingAgent)
    assert not isinstance(agent, ObservingAgent)
