"""Outgoing approval webhooks: tell people and chat rooms that a plan waits, runs, ended or was decided.

What is sent. One JSON object per event (`payload`): the event, the plan's id
and content hash, the resource and its labels, the risk, the policy decision
and the rule that made it, the planner and its reasoning, the record's state
and message, each step's tool, description and risk, when a pending approval
expires, the decision taken (if any), and how to decide: the commands
`setpoint approve ID` / `setpoint reject ID --reason TEXT`, and approve and
reject URLs when the daemon has a public URL. Step parameters are never sent:
they can hold file contents and secrets, and a chat room is no place for
those. A `slack` hook gets `{"text": ...}` instead: a short message made from
the same payload. The body is compact JSON with sorted keys.

How a receiver knows it came from us. A hook with a secret carries
`X-Setpoint-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw request body
keyed with the shared secret. The receiver recomputes it over the bytes it
received (before parsing the JSON: a re-serialised body is not the same bytes)
and compares the two with a constant-time comparison such as
`hmac.compare_digest`. `X-Setpoint-Event` names the event, so a receiver can
route without parsing.

Delivery. `Notifier.send` never blocks its caller and never raises: it builds
the body at once, a snapshot of the record as it is then, and queues it. Each
hook has its own queue and worker, so a hook that is down or slow delays only
itself. A 2xx answer is delivered. A 5xx, 408, 429, timeout or connection error
is retried with jittered exponential backoff, up to the hook's `attempts`; any
other answer (another 4xx, or a redirect, which is not followed) means sending
the same request again will not help. A full queue drops the new delivery,
counts it and says so.

Queues live in memory: what is still queued when the daemon stops (after
`drain`'s grace period) is lost, so delivery is at most once across restarts.
Within one run, a retry after a lost answer can deliver an event twice, so a
receiver should treat (plan_id, event) as idempotent. The plan record in etcd
stays the truth; a webhook only points at it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from plans import ApprovalNote, PlanRecord, PlanState

log = structlog.get_logger("setpoint.hooks")

_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_RETRIED_STATUSES = frozenset({408, 429})
_RESPONSE_PREVIEW_BYTES = 200  # of a failed answer's body, for the log
_SLACK_STEPS = 3  # step descriptions shown in a Slack message
_SLACK_TEXT_CHARS = 300  # of a message or reason shown in a Slack message


class Event(StrEnum):
    APPROVAL_REQUESTED = "approval_requested"  # a plan waits for a person
    NOTIFY = "notify"  # a plan under a `notify` policy starts running
    OUTCOME = "outcome"  # an approved or notify plan finished (record.state says how)
    REJECTED = "rejected"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True, repr=False)
class Webhook:
    """One receiver.

    `secret` keys the body's signature (None: unsigned). `format` "json" sends
    the payload, "slack" a `{"text": ...}` message for a Slack incoming webhook;
    defaults to "json". Each attempt times out after `timeout_seconds` (defaults
    to 10 s); a delivery is tried at most `attempts` times (defaults to 5).
    """

    url: str
    secret: bytes | None
    format: Literal["json", "slack"] = "json"
    timeout_seconds: float = 10.0
    attempts: int = 5

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError as e:
            raise ValueError(f"webhook {_loggable(self.url, hide_path=True)}: the port is not a number") from e
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook url must be an http:// or https:// URL with a host")
        if self.format not in ("json", "slack"):
            raise ValueError(f"webhook format must be json or slack, not {self.format!r}")
        if self.timeout_seconds <= 0 or self.attempts < 1:
            raise ValueError("a webhook needs timeout_seconds > 0 and attempts >= 1")

    def __repr__(self) -> str:
        # Never the secret, and not a Slack URL's path: that path is the credential.
        return (
            f"Webhook(url={self.log_url!r}, signed={self.secret is not None}, format={self.format!r}, "
            f"timeout_seconds={self.timeout_seconds}, attempts={self.attempts})"
        )

    @property
    def log_url(self) -> str:
        """The URL as it may appear in logs: no user, password or query, and no path for Slack."""
        return _loggable(self.url, hide_path=self.format == "slack")


def _loggable(url: str, *, hide_path: bool) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    path = ("/…" if parts.path.strip("/") else "") if hide_path else parts.path
    return f"{parts.scheme}://{host}{port}{path}"


def payload(event: Event, record: PlanRecord, *, labels: Mapping[str, str], public_url: str | None) -> dict[str, Any]:
    """The JSON payload for `event` on `record`; see the module docstring. Carries no step parameters."""
    event = Event(event)
    plan = record.plan
    approve_url = reject_url = None
    if event is Event.APPROVAL_REQUESTED and public_url:
        base = f"{public_url.rstrip('/')}/v1/plans/{plan.id}"
        approve_url, reject_url = f"{base}/approve", f"{base}/reject"
    approval = record.approval
    return {
        "event": event.value,
        "plan_id": plan.id,
        "plan_hash": record.plan_hash,
        "resource": str(plan.resource),
        "kind": plan.resource.kind,
        "name": plan.resource.name,
        "labels": dict(labels),
        "risk": plan.risk.value,
        "decision": record.decision,
        "decision_rule": record.decision_rule,
        "decision_reason": record.decision_reason,
        "reasoning": plan.reasoning,
        "planner": plan.planner,
        "state": record.state.value,
        "message": record.message,
        "steps": [{"tool": step.tool, "description": step.description, "risk": step.risk.value} for step in plan.steps],
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        "approval": None if approval is None else _approval(approval),
        "approve_url": approve_url,
        "reject_url": reject_url,
        "approve_command": f"setpoint approve {plan.id}",
        "reject_command": f"setpoint reject {plan.id} --reason TEXT",
    }


def _approval(note: ApprovalNote) -> dict[str, str]:
    return {"decision": note.decision, "by": note.by, "reason": note.reason, "at": note.at.isoformat()}


def slack_text(body: dict[str, Any]) -> dict[str, str]:
    """`{"text": ...}`: a short message for a person, made from a `payload`."""
    resource, plan_id = body["resource"], body["plan_id"]
    why = f"risk {body['risk']}" + (f", rule {_escape(body['decision_rule'])}" if body["decision_rule"] else "")
    match body["event"]:
        case Event.APPROVAL_REQUESTED:
            head = f":warning: setpoint: {resource} needs approval ({why})"
        case Event.NOTIFY:
            head = f":information_source: setpoint: {resource}: running plan {plan_id} ({why})"
        case Event.OUTCOME:
            icon = ":white_check_mark:" if body["state"] == PlanState.SUCCEEDED else ":x:"
            head = f"{icon} setpoint: {resource}: plan {plan_id} {body['state']}"
        case Event.REJECTED:
            approval = body["approval"] or {}
            by = f" by {_escape(approval['by'])}" if approval.get("by") else ""
            head = f":no_entry: setpoint: {resource}: plan {plan_id} rejected{by}"
        case _:
            head = f":hourglass: setpoint: {resource}: plan {plan_id} expired without a decision"
    lines = [f"{head}: {_steps_summary(body['steps'])}"]
    detail = _detail(body)
    if detail:
        lines.append(_escape(_cut(detail)))
    if body["event"] == Event.APPROVAL_REQUESTED:
        approve = f"Approve: `{body['approve_command']}`"
        if body["approve_url"]:
            approve += f" or <{body['approve_url']}>"
        lines.append(f"{approve}. Reject: `{body['reject_command']}`.")
        if body["expires_at"]:
            lines.append(f"Expires at {body['expires_at']}.")
    return {"text": "\n".join(lines)}


def _steps_summary(steps: list[dict[str, str]]) -> str:
    shown = "; ".join(_escape(step["description"] or step["tool"]) for step in steps[:_SLACK_STEPS])
    more = len(steps) - _SLACK_STEPS
    return (shown or "no steps") + (f" (and {more} more)" if more > 0 else "")


def _detail(body: dict[str, Any]) -> str:
    if body["event"] == Event.REJECTED and body["approval"]:
        return str(body["approval"]["reason"])
    if body["event"] == Event.OUTCOME:
        return str(body["message"])
    return ""


def _cut(text: str) -> str:
    return text if len(text) <= _SLACK_TEXT_CHARS else text[: _SLACK_TEXT_CHARS - 1] + "…"


def _escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>): text from planners and people must not make any.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def signature(secret: bytes, body: bytes) -> str:
    """'sha256=' and the hex HMAC-SHA256 of the raw body keyed with `secret`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def read_secret(*, env: str | None, file: str | None, what: str) -> bytes | None:
    """The secret in environment variable `env` or in file `file`, stripped of surrounding whitespace;
    None when both are None. Raises ValueError naming `what` and where it looked when the variable is unset
    or empty, the file unreadable or empty, or both are given."""
    if env is not None and file is not None:
        raise ValueError(f"{what}: give the secret in environment variable {env} or in file {file}, not both")
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ValueError(f"{what}: environment variable {env} is unset or empty")
        return value.encode("utf-8")
    if file is not None:
        try:
            data = Path(file).read_bytes().strip()
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            raise ValueError(f"{what}: cannot read secret file {file}: {reason}") from e
        if not data:
            raise ValueError(f"{what}: secret file {file} is empty")
        return data
    return None


@dataclass(frozen=True, slots=True)
class _Delivery:
    event: Event
    plan_id: str
    body: bytes


class _Outcome(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"  # the receiver may take it later
    GIVE_UP = "give_up"  # the same request will be refused again


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: _Outcome
    number: int
    status: int | None = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class _Channel:
    """One hook, its queue, and its URL as logs may show it."""

    hook: Webhook
    queue: asyncio.Queue[_Delivery]
    url: str


class Notifier:
    """Delivers events to webhooks in the background; see the module docstring.

    Each hook queues at most `max_queued` deliveries (defaults to 1000). A
    failed attempt waits a random time between half and all of
    `backoff_base` * 2^(attempt-1) seconds, capped at `backoff_max` (defaults
    to 0.5 s and 30 s). `delivered`, `failed` and `dropped` count deliveries.
    """

    def __init__(
        self,
        hooks: Sequence[Webhook],
        *,
        public_url: str | None,
        max_queued: int = 1000,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if max_queued < 1 or backoff_base < 0 or backoff_max < backoff_base:
            raise ValueError("the notifier needs max_queued >= 1 and 0 <= backoff_base <= backoff_max")
        self._channels = [_Channel(hook, asyncio.Queue(maxsize=max_queued), hook.log_url) for hook in hooks]
        self._public_url = public_url
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def send(self, event: Event, record: PlanRecord, *, labels: Mapping[str, str] = _NO_LABELS) -> None:
        """Queue one delivery of `event` per hook, with the record as it is now; never blocks, never raises.

        With no hooks it does nothing. A hook whose queue is full loses this
        delivery: it is counted in `dropped` and logged.
        """
        if not self._channels:
            return
        body = payload(event, record, labels=labels, public_url=self._public_url)
        encoded: dict[str, bytes] = {}
        for channel in self._channels:
            fmt = channel.hook.format
            if fmt not in encoded:
                encoded[fmt] = _encode(slack_text(body) if fmt == "slack" else body)
            delivery = _Delivery(Event(event), record.plan.id, encoded[fmt])
            try:
                channel.queue.put_nowait(delivery)
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning(
                    "hook.dropped", url=channel.url, hook_event=delivery.event.value, plan_id=delivery.plan_id,
                    queued=channel.queue.qsize(),
                )  # fmt: skip

    async def run(self) -> None:
        """Deliver queued events until cancelled, one worker per hook over one HTTP session."""
        if not self._channels:
            await asyncio.Event().wait()  # nothing will ever be queued; run until cancelled like any component
            return
        async with (
            aiohttp.ClientSession(headers={"User-Agent": "setpoint"}, cookie_jar=aiohttp.DummyCookieJar()) as session,
            asyncio.TaskGroup() as workers,
        ):
            for index, channel in enumerate(self._channels):
                workers.create_task(self._work(session, channel), name=f"hook-{index}")

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for every queued delivery to be delivered or given up on.

        What is left when the time is up is logged; it is lost when the daemon
        stops.
        """
        try:
            async with asyncio.timeout(timeout):
                for channel in self._channels:
                    await channel.queue.join()
        except TimeoutError:
            for channel in self._channels:
                if channel.queue.qsize():
                    log.warning("hook.undelivered", url=channel.url, queued=channel.queue.qsize(), timeout=timeout)

    async def _work(self, session: aiohttp.ClientSession, channel: _Channel) -> None:
        while True:
            delivery = await channel.queue.get()
            fields = {"url": channel.url, "hook_event": delivery.event.value, "plan_id": delivery.plan_id}
            try:
                last = await self._deliver(session, channel.hook, delivery, fields)
                if last.outcome is _Outcome.DELIVERED:
                    self.delivered += 1
                    log.debug("hook.delivered", **fields, attempt=last.number, status=last.status)
                else:
                    self.failed += 1
                    log.warning("hook.failed", **fields, attempt=last.number, status=last.status, error=last.error)
            except Exception as e:  # the worker's boundary: a bug must not end this hook's deliveries
                self.failed += 1
                log.exception("hook.error", **fields, error_type=type(e).__name__)
            finally:
                channel.queue.task_done()

    async def _deliver(
        self, session: aiohttp.ClientSession, hook: Webhook, delivery: _Delivery, fields: dict[str, str]
    ) -> _Attempt:
        headers = {"Content-Type": "application/json", "X-Setpoint-Event": delivery.event.value}
        if hook.secret is not None:
            headers["X-Setpoint-Signature"] = signature(hook.secret, delivery.body)
        number = 1
        while True:
            attempt = await _post(session, hook, delivery.body, headers, number)
            if attempt.outcome is not _Outcome.RETRY or number >= hook.attempts:
                return attempt
            delay = self._backoff(number)
            log.info(
                "hook.retrying", **fields, attempt=number, status=attempt.status, error=attempt.error,
                retry_in=round(delay, 3),
            )  # fmt: skip
            await asyncio.sleep(delay)
            number += 1

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_base * 2.0 ** (attempt - 1))
        # Jitter, so hooks behind one proxy that failed together do not retry in lockstep.
        return ceiling * random.uniform(0.5, 1.0)


async def _post(
    session: aiohttp.ClientSession, hook: Webhook, body: bytes, headers: dict[str, str], number: int
) -> _Attempt:
    timeout = aiohttp.ClientTimeout(total=hook.timeout_seconds)
    try:
        async with session.post(
            hook.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            status = response.status
            if 200 <= status < 300:
                return _Attempt(_Outcome.DELIVERED, number, status)
            preview = await response.content.read(_RESPONSE_PREVIEW_BYTES)
            retry = status >= 500 or status in _RETRIED_STATUSES
            error = preview.decode("utf-8", "replace")
            return _Attempt(_Outcome.RETRY if retry else _Outcome.GIVE_UP, number, status, error)
    except TimeoutError:
        return _Attempt(_Outcome.RETRY, number, error=f"no answer within {hook.timeout_seconds} s")
    except aiohttp.InvalidURL:
        return _Attempt(_Outcome.GIVE_UP, number, error="invalid url")  # its text would repeat the URL
    except aiohttp.ClientError as e:
        return _Attempt(_Outcome.RETRY, number, error=f"{type(e).__name__}: {e}")


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
