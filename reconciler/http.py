"""The daemon's HTTP endpoint, one port for everything:

- `GET /metrics`: Prometheus metrics.
- `GET /healthz`: the process answers.
- `GET /readyz`: the initial list is cached and leadership is known; the body says `ready: leader` or
  `ready: standby`.
- `POST /v1/alerts`: Alertmanager's webhook (version 4); each firing alert
  labelled `setpoint_kind` and `setpoint_name` becomes an issue, each
  resolved one deletes it (`alerts.py`). With a token configured it needs
  `Authorization: Bearer <token>` (401 without). 200 with how many alerts
  were reported, resolved, unchanged, ignored (no setpoint labels) and
  invalid; 400 with one sentence for a malformed payload, which changes
  nothing; 413 above 1 MiB; 503 while etcd cannot be reached (Alertmanager
  sends it again). Present only when the daemon is built with an `AlertApi`.
- `POST /v1/plans/{plan_id}/approve` and `POST /v1/plans/{plan_id}/reject`:
  a person's decision on a plan awaiting approval, given with
  `Authorization: Bearer <token>` and an optional JSON body
  `{"by": ..., "reason": ..., "plan_hash": ...}`. Present only when the
  daemon is built with an `ApprovalApi`.

The approval routes only write the decision (`reconciler.decisions.decide`,
the same path as `setpoint approve`); the daemon then checks it against the
plan and records whether it was taken. So 200 means "recorded", not
"executed". Every answer of these routes is JSON, `{"error": "<one
sentence>"}` when refused: 401 (no or wrong token), 403 (no token is
configured), 400/413 (a bad body), 404 (no such plan), 409 (not awaiting
approval, or a decision is already waiting), 503 (etcd not reachable).

A port that cannot be had (taken, or not allowed) is a `StartupError` that
says which address and which setting, not a traceback.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from plans import ApprovalDecision
from plans.approval import MAX_REASON_CHARS
from reconciler import alerts
from reconciler.decisions import Refused, decide
from reconciler.errors import StartupError
from reconciler.keys import PLAN_ID_PATTERN, KeySpace
from reconciler.metrics import Metrics
from reconciler.store import EtcdStore, StoreError, StoreUnavailableError

log = structlog.get_logger("setpoint.http")

MAX_BODY_BYTES = 64 * 1024
MAX_ALERT_BODY_BYTES = 1024 * 1024
MAX_BY_CHARS = 100  # as `Approval.by`
_PLAN_HASH = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("by", "reason", "plan_hash")
_DEFAULT_REASON = {ApprovalDecision.APPROVE: "", ApprovalDecision.REJECT: "rejected through the HTTP API"}
_STATUS = {Refused.NOT_FOUND: 404, Refused.NOT_APPLICABLE: 409, Refused.ALREADY_DECIDED: 409, Refused.INVALID: 409}
_OFF = "HTTP approvals are off: set approvals.token_file or approvals.token_env"


@dataclass(frozen=True, slots=True)
class ApprovalApi:
    """What the approval routes need: the bearer token, the key space, and the store once connected."""

    token: bytes | None  # None: HTTP approvals are off (the routes answer 403)
    keys: KeySpace
    store: Callable[[], EtcdStore | None]  # the daemon's store once connected, else None


@dataclass(frozen=True, slots=True)
class AlertApi:
    """What `POST /v1/alerts` needs: its optional bearer token, the key space, and the store once connected."""

    token: bytes | None  # None: alerts are taken from anyone who can reach the port
    keys: KeySpace
    store: Callable[[], EtcdStore | None]


@dataclass(frozen=True, slots=True)
class _Body:
    by: str
    reason: str
    plan_hash: str | None


class HttpServer:
    def __init__(
        self,
        *,
        listen: str,
        metrics: Metrics,
        ready: Callable[[], str | None],
        approvals: ApprovalApi | None = None,
        alerts: AlertApi | None = None,
    ) -> None:
        """`approvals`, `alerts`: what those routes need; each defaults to None, and then its routes do not exist."""
        self._listen = listen
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._metrics = metrics
        self._ready = ready
        self._approvals = approvals
        self._alerts = alerts
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/readyz", self._handle_readyz)
        if self._approvals is not None:
            routes = _ApprovalRoutes(self._approvals)
            app.router.add_post("/v1/plans/{plan_id}/approve", routes.approve)
            app.router.add_post("/v1/plans/{plan_id}/reject", routes.reject)
        if self._alerts is not None:
            app.router.add_post("/v1/alerts", _AlertRoutes(self._alerts, self._metrics).receive)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            # A bind error's own text repeats the address; a lookup error's number is not an errno.
            reason = os.strerror(e.errno) if e.errno and e.errno > 0 else e.strerror or str(e)
            raise StartupError(f"cannot listen on {self._listen} (http.listen): {reason.lower()}") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _handle_readyz(self, request: web.Request) -> web.Response:
        role = self._ready()
        if role is not None:
            return web.Response(text=f"ready: {role}\n")
        return web.Response(status=503, text="not ready: the initial list is not cached or leadership not known yet\n")


class _ApprovalRoutes:
    """The handlers of `POST /v1/plans/{plan_id}/approve|reject`."""

    def __init__(self, api: ApprovalApi) -> None:
        self._api = api

    async def approve(self, request: web.Request) -> web.Response:
        return await self._handle(request, ApprovalDecision.APPROVE)

    async def reject(self, request: web.Request) -> web.Response:
        return await self._handle(request, ApprovalDecision.REJECT)

    async def _handle(self, request: web.Request, decision: ApprovalDecision) -> web.Response:
        plan_id = request.match_info["plan_id"]
        # The boundary of these routes: whatever goes wrong, the caller gets one JSON sentence.
        try:
            return await self._decide(request, plan_id, decision)
        except Exception:
            log.exception("http.approval.failed", plan_id=plan_id[:100], decision=decision.value)
            return _error(500, "internal error while recording the decision; see the daemon's log")

    async def _decide(self, request: web.Request, plan_id: str, decision: ApprovalDecision) -> web.Response:
        api = self._api
        if api.token is None:
            return _error(403, _OFF)
        refused = _check_bearer(request.headers.get("Authorization"), api.token)
        if refused is not None:
            log.warning("http.approval.unauthorized", remote=request.remote, plan_id=plan_id[:100], why=refused)
            return _error(401, refused, headers={"WWW-Authenticate": "Bearer"})
        if PLAN_ID_PATTERN.fullmatch(plan_id) is None:
            return _error(404, f"no plan {plan_id[:100]!r}: a plan id matches {PLAN_ID_PATTERN.pattern}")
        raw = await _read_capped(request)
        if raw is None:
            return _error(413, f"the request body is larger than {MAX_BODY_BYTES // 1024} KiB")
        body = _parse_body(raw, decision)
        if isinstance(body, str):
            return _error(400, body)
        store = api.store()
        if store is None:
            return _error(503, "not connected to etcd yet")
        try:
            submitted = await decide(
                store, api.keys, plan_id, decision,
                by=body.by, reason=body.reason, source="http", plan_hash=body.plan_hash,
            )  # fmt: skip
        except (StoreUnavailableError, StoreError) as e:
            log.warning("http.approval.store_failed", plan_id=plan_id, error=str(e)[:500])
            return _error(503, f"could not record the decision: {str(e)[:300]}")
        if submitted.approval is None:
            status = 409 if submitted.refused is None else _STATUS[submitted.refused]
            return _error(status, submitted.message)
        log.info("http.approval.recorded", plan_id=plan_id, decision=decision.value, by=body.by)
        return web.json_response({"plan_id": plan_id, "approval": submitted.approval.model_dump(mode="json")})


class _AlertRoutes:
    """The handler of `POST /v1/alerts`."""

    def __init__(self, api: AlertApi, metrics: Metrics) -> None:
        self._api = api
        self._metrics = metrics

    async def receive(self, request: web.Request) -> web.Response:
        # The boundary of this route: whatever goes wrong, Alertmanager gets one JSON sentence.
        try:
            return await self._receive(request)
        except Exception:
            log.exception("http.alerts.failed")
            return _error(500, "internal error while recording the alerts; see the daemon's log")

    async def _receive(self, request: web.Request) -> web.Response:
        api = self._api
        if api.token is not None:
            refused = _check_bearer(request.headers.get("Authorization"), api.token)
            if refused is not None:
                log.warning("http.alerts.unauthorized", remote=request.remote, why=refused)
                return _error(401, refused, headers={"WWW-Authenticate": "Bearer"})
        raw = await _read_capped(request, MAX_ALERT_BODY_BYTES)
        if raw is None:
            return _error(413, f"the request body is larger than {MAX_ALERT_BODY_BYTES // 1024 // 1024} MiB")
        batch = alerts.parse(raw)
        if isinstance(batch, str):
            log.warning("http.alerts.refused", remote=request.remote, reason=batch)
            return _error(400, batch)
        store = api.store()
        if store is None:
            return _error(503, "not connected to etcd yet")
        try:
            counts = await alerts.apply(store, api.keys, batch)
        except (StoreUnavailableError, StoreError) as e:
            log.warning("http.alerts.store_failed", error=str(e)[:500])
            return _error(503, f"could not record the alerts: {str(e)[:300]}")
        for result, count in counts.items():
            self._metrics.alerts_received.labels(result=result).inc(count)
        log.info("http.alerts.received", **counts)
        return web.json_response({result: counts.get(result, 0) for result in alerts.RESULTS})


def _error(status: int, message: str, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _check_bearer(header: str | None, token: bytes) -> str | None:
    """Why the Authorization header does not carry `token` (one sentence), or None when it does."""
    if not header:
        return "missing Authorization header: send Authorization: Bearer <token>"
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return "the Authorization scheme must be Bearer"
    try:
        given = credentials.strip().encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "wrong bearer token"
    # Constant time, so the answer's timing says nothing about how much of the token was right.
    if not hmac.compare_digest(given, token):
        return "wrong bearer token"
    return None


async def _read_capped(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """The request body, or None when it is larger than `limit` bytes (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(raw: bytes, decision: ApprovalDecision) -> _Body | str:
    """The body's fields with their defaults, or what is wrong with it (one sentence)."""
    fields: dict[str, Any] = {}
    if raw.strip():
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            return "the request body is not valid JSON"
        if not isinstance(parsed, dict):
            return 'the request body must be a JSON object like {"by": "...", "reason": "..."}'
        fields = parsed
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(repr(f[:50]) for f in unknown[:5])}: allowed are by, reason, plan_hash"
    wrong = [name for name in _FIELDS if name in fields and not isinstance(fields[name], str)]
    if wrong:
        return f"field {wrong[0]!r} must be a string"
    by = fields.get("by", "http")
    if not by.strip() or len(by) > MAX_BY_CHARS:
        return f"'by' must be 1 to {MAX_BY_CHARS} characters"
    reason = fields.get("reason", "") or _DEFAULT_REASON[decision]
    if len(reason) > MAX_REASON_CHARS:
        return f"'reason' must be at most {MAX_REASON_CHARS} characters"
    plan_hash = fields.get("plan_hash")
    if plan_hash is not None and _PLAN_HASH.fullmatch(plan_hash) is None:
        return "'plan_hash' must be 64 lowercase hex characters (the sha256 shown with the plan)"
    return _Body(by=by, reason=reason, plan_hash=plan_hash)
