"""Webhooks against real HTTP servers on 127.0.0.1: signatures over the raw body, retries, isolation, drops.

Each `Receiver` is an aiohttp server that records every request's headers and
raw body and answers from a script of statuses (200 once the script is used
up), or never answers at all. Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from multidict import CIMultiDict

from plans import ApprovalNote, ExecutionPlan, PlanRecord, PlanState, ResourceKey, RiskLevel, Step
from policies.hooks import Event, Notifier, Webhook, payload, read_secret, signature, slack_text

SECRET = b"s3cret-hook-key"
LEAKY = "AKIA-do-not-send-me-0123456789"
PUBLIC_URL = "https://setpoint.example.org/"


def make_record(*, parameters: dict[str, Any] | None = None) -> PlanRecord:
    plan = ExecutionPlan(
        agent="file",
        resource=ResourceKey(kind="file", name="motd"),
        steps=(
            Step(
                tool="file.delete",
                parameters=parameters or {"path": "/x"},
                description="delete /x",
                risk=RiskLevel.HIGH,
            ),
        ),
        desired_revision=7,
    )
    return PlanRecord.start(
        plan, decision="approve", decision_reason="high risk needs a person", decision_rule="defaults.high"
    )


@dataclass
class Received:
    headers: CIMultiDict[str]
    body: bytes


class Receiver:
    def __init__(self, statuses: Iterable[int], *, hang: bool) -> None:
        self.statuses = list(statuses)
        self.hang = hang
        self.requests: list[Received] = []
        self.received = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(CIMultiDict(request.headers), await request.read()))
        self.received.set()
        if self.hang:
            await self.release.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="nope" if status >= 300 else "ok")

    def only(self) -> Received:
        assert len(self.requests) == 1, f"expected one request, got {len(self.requests)}"
        return self.requests[0]


Serve = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[tuple[Receiver, web.AppRunner]] = []

    async def start(statuses: Iterable[int] = (), *, hang: bool = False) -> Receiver:
        receiver = Receiver(statuses, hang=hang)
        app = web.Application()
        app.router.add_post("/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks/setpoint"
        started.append((receiver, runner))
        return receiver

    yield start
    for receiver, runner in started:
        receiver.release.set()
        await runner.cleanup()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[None]:
    task = asyncio.create_task(notifier.run())
    try:
        yield
    finally:
        assert not task.done(), "run() ended on its own"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def deliver(notifier: Notifier, event: Event, record: PlanRecord, **labels: str) -> None:
    async with running(notifier):
        notifier.send(event, record, labels=labels)
        await notifier.drain(10)


async def test_the_signature_is_the_hmac_of_the_exact_raw_body(serve: Serve) -> None:
    receiver = await serve()
    notifier = Notifier([Webhook(receiver.url, SECRET)], public_url=PUBLIC_URL, backoff_base=0.01)
    record = make_record()

    await deliver(notifier, Event.APPROVAL_REQUESTED, record, team="web")

    got = receiver.only()
    expected = "sha256=" + hmac.new(SECRET, got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-Setpoint-Signature"], expected)
    assert got.headers["X-Setpoint-Event"] == "approval_requested"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "setpoint"
    body = json.loads(got.body)
    assert got.body == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    plan_id = record.plan.id
    assert body["event"] == "approval_requested" and body["plan_id"] == plan_id
    assert body["plan_hash"] == record.plan_hash
    assert (body["resource"], body["kind"], body["name"]) == ("file/motd", "file", "motd")
    assert body["labels"] == {"team": "web"}
    assert (body["risk"], body["decision"], body["decision_rule"]) == ("high", "approve", "defaults.high")
    assert body["steps"] == [{"tool": "file.delete", "description": "delete /x", "risk": "high"}]
    assert body["approve_url"] == f"https://setpoint.example.org/v1/plans/{plan_id}/approve"
    assert body["reject_url"] == f"https://setpoint.example.org/v1/plans/{plan_id}/reject"
    assert body["approve_command"] == f"setpoint approve {plan_id}"
    assert body["reject_command"] == f"setpoint reject {plan_id} --reason TEXT"
    assert notifier.delivered == 1 and notifier.failed == 0


async def test_an_unsigned_hook_sends_no_signature(serve: Serve) -> None:
    receiver = await serve()
    notifier = Notifier([Webhook(receiver.url, None)], public_url=None, backoff_base=0.01)

    await deliver(notifier, Event.NOTIFY, make_record())

    got = receiver.only()
    assert "X-Setpoint-Signature" not in got.headers
    assert got.headers["X-Setpoint-Event"] == "notify"


async def test_a_slack_hook_gets_a_text_naming_the_resource_and_the_approve_command(serve: Serve) -> None:
    receiver = await serve()
    notifier = Notifier([Webhook(receiver.url, None, format="slack")], public_url=PUBLIC_URL, backoff_base=0.01)
    record = make_record()

    await deliver(notifier, Event.APPROVAL_REQUESTED, record)

    body = json.loads(receiver.only().body)
    assert list(body) == ["text"]
    text = body["text"]
    assert "file/motd" in text and "needs approval" in text and "defaults.high" in text
    assert f"setpoint approve {record.plan.id}" in text
    assert f"/v1/plans/{record.plan.id}/approve" in text


@pytest.mark.parametrize(("statuses", "attempts"), [([500, 500, 200], 3), ([429, 200], 2), ([408, 200], 2)])
async def test_server_errors_and_throttling_are_retried_until_delivered(
    serve: Serve, statuses: list[int], attempts: int
) -> None:
    receiver = await serve(statuses)
    notifier = Notifier([Webhook(receiver.url, SECRET)], public_url=None, backoff_base=0.01)

    await deliver(notifier, Event.OUTCOME, make_record())

    assert len(receiver.requests) == attempts
    assert len({r.body for r in receiver.requests}) == 1, "a retry sends the same body"
    assert (notifier.delivered, notifier.failed) == (1, 0)


async def test_a_client_error_is_not_retried_and_is_logged_without_the_secret(serve: Serve) -> None:
    receiver = await serve([400])
    notifier = Notifier([Webhook(receiver.url, SECRET, attempts=5)], public_url=None, backoff_base=0.01)
    record = make_record()

    with structlog.testing.capture_logs() as logs:
        await deliver(notifier, Event.REJECTED, record)

    assert len(receiver.requests) == 1
    assert (notifier.delivered, notifier.failed) == (0, 1)
    failed = [e for e in logs if e["event"] == "hook.failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "warning"
    assert failed[0]["url"] == receiver.url and failed[0]["plan_id"] == record.plan.id
    assert (failed[0]["hook_event"], failed[0]["attempt"], failed[0]["status"]) == ("rejected", 1, 400)
    assert SECRET.decode() not in repr(logs)


async def test_a_hook_that_keeps_failing_is_given_up_after_its_attempts(serve: Serve) -> None:
    receiver = await serve([503] * 10)
    notifier = Notifier([Webhook(receiver.url, None, attempts=3)], public_url=None, backoff_base=0.01)

    with structlog.testing.capture_logs() as logs:
        await deliver(notifier, Event.EXPIRED, make_record())

    assert len(receiver.requests) == 3
    assert (notifier.delivered, notifier.failed) == (0, 1)
    assert [(e["attempt"], e["status"]) for e in logs if e["event"] == "hook.failed"] == [(3, 503)]


async def test_a_dead_or_hanging_hook_does_not_delay_a_live_one(serve: Serve) -> None:
    hanging = await serve(hang=True)
    live = await serve()
    hooks = [
        Webhook(closed_port_url(), None, attempts=5),
        Webhook(hanging.url, None, timeout_seconds=60),
        Webhook(live.url, None),
    ]
    # Long backoff: were deliveries serialised, the live hook would wait behind the dead one's retries.
    notifier = Notifier(hooks, public_url=None, backoff_base=10, backoff_max=10)

    async with running(notifier):
        notifier.send(Event.NOTIFY, make_record())
        await asyncio.wait_for(live.received.wait(), timeout=5)
        await asyncio.wait_for(hanging.received.wait(), timeout=5)

    assert len(live.requests) == 1
    assert notifier.failed == 0, "the dead hook is still waiting to retry"


async def test_step_parameters_are_never_sent(serve: Serve) -> None:
    json_hook, slack_hook = await serve(), await serve()
    hooks = [Webhook(json_hook.url, SECRET), Webhook(slack_hook.url, SECRET, format="slack")]
    notifier = Notifier(hooks, public_url=PUBLIC_URL, backoff_base=0.01)
    record = make_record(parameters={"path": "/etc/motd", "content": LEAKY})

    async with running(notifier):
        for event in Event:
            notifier.send(event, record)
        await notifier.drain(10)

    bodies = [r.body for r in json_hook.requests + slack_hook.requests]
    assert len(bodies) == 2 * len(Event)
    for body in bodies:
        assert LEAKY.encode() not in body
        assert b"parameters" not in body and b"/etc/motd" not in body


async def test_a_full_queue_drops_counts_and_warns(serve: Serve) -> None:
    receiver = await serve()
    notifier = Notifier([Webhook(receiver.url, None)], public_url=None, max_queued=2, backoff_base=0.01)
    record = make_record()

    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            notifier.send(Event.NOTIFY, record)

    assert notifier.dropped == 3
    dropped = [e for e in logs if e["event"] == "hook.dropped"]
    assert len(dropped) == 3 and all(e["log_level"] == "warning" for e in dropped)
    async with running(notifier):
        await notifier.drain(10)
    assert len(receiver.requests) == 2 and notifier.delivered == 2


async def test_without_hooks_send_does_nothing_and_run_waits_to_be_cancelled() -> None:
    notifier = Notifier([], public_url=None)

    async with running(notifier):
        notifier.send(Event.NOTIFY, make_record())
        await notifier.drain(1)
        await asyncio.sleep(0.01)

    assert (notifier.delivered, notifier.failed, notifier.dropped) == (0, 0, 0)


def test_urls_only_when_approval_is_requested_and_a_public_url_is_known() -> None:
    record = make_record()

    assert payload(Event.APPROVAL_REQUESTED, record, labels={}, public_url=None)["approve_url"] is None
    for event in (Event.NOTIFY, Event.OUTCOME, Event.REJECTED, Event.EXPIRED):
        body = payload(event, record, labels={}, public_url=PUBLIC_URL)
        assert body["approve_url"] is None and body["reject_url"] is None
        assert body["approve_command"] == f"setpoint approve {record.plan.id}"


def test_a_decided_plan_carries_its_approval_and_expiry() -> None:
    at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    note = ApprovalNote(decision="reject", by="alice", reason="not <!channel> today", at=at, source="cli")
    record = make_record().model_copy(update={"state": PlanState.REJECTED, "approval": note, "expires_at": at})

    body = payload(Event.REJECTED, record, labels={}, public_url=None)

    assert body["approval"] == {
        "decision": "reject",
        "by": "alice",
        "reason": "not <!channel> today",
        "at": at.isoformat(),
    }
    assert body["expires_at"] == at.isoformat() and body["state"] == "rejected"
    text = slack_text(body)["text"]
    assert "rejected by alice" in text
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text, "people's text cannot mention a channel"


def test_signature_is_sha256_hmac_in_hex() -> None:
    assert signature(b"key", b"body") == "sha256=" + hmac.new(b"key", b"body", hashlib.sha256).hexdigest()


def test_a_webhooks_repr_shows_neither_its_secret_nor_a_slack_path() -> None:
    hook = Webhook("https://hooks.slack.com/services/T0/B0/tokentoken", SECRET, format="slack")

    assert SECRET.decode() not in repr(hook) and "tokentoken" not in repr(hook)
    assert hook.log_url == "https://hooks.slack.com/…"
    assert Webhook("https://u:pw@example.org:8443/hook?key=k", None).log_url == "https://example.org:8443/hook"
    with pytest.raises(ValueError, match="http"):
        Webhook("ftp://example.org/hook", None)


def test_read_secret_from_the_environment_or_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOOK_SECRET", "  from-env\n")
    secret_file = tmp_path / "secret"
    secret_file.write_text("\n from-file \n")

    assert read_secret(env="HOOK_SECRET", file=None, what="the ops webhook's secret") == b"from-env"
    assert read_secret(env=None, file=str(secret_file), what="the ops webhook's secret") == b"from-file"
    assert read_secret(env=None, file=None, what="the ops webhook's secret") is None


def test_read_secret_says_what_and_where_when_it_cannot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    what = "the ops webhook's secret"
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    monkeypatch.setenv("EMPTY_SECRET", "  ")
    empty = tmp_path / "empty"
    empty.write_text(" \n")

    with pytest.raises(ValueError, match=r"^the ops webhook's secret: environment variable HOOK_SECRET is unset"):
        read_secret(env="HOOK_SECRET", file=None, what=what)
    with pytest.raises(ValueError, match="environment variable EMPTY_SECRET is unset or empty"):
        read_secret(env="EMPTY_SECRET", file=None, what=what)
    with pytest.raises(ValueError, match=rf"^{what}: cannot read secret file {tmp_path}/missing: no such file"):
        read_secret(env=None, file=str(tmp_path / "missing"), what=what)
    with pytest.raises(ValueError, match=rf"^{what}: secret file {empty} is empty$"):
        read_secret(env=None, file=str(empty), what=what)
    with pytest.raises(ValueError, match="not both"):
        read_secret(env="EMPTY_SECRET", file=str(empty), what=what)
