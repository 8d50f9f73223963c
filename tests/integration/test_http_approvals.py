"""`POST /v1/plans/<id>/approve|reject` against the real etcd: auth, body checks, and what lands in etcd."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from plans import Approval, ApprovalDecision, ExecutionPlan, PlanRecord, PlanState, ResourceKey, RiskLevel, Step
from reconciler.embedded import EmbeddedEtcd
from reconciler.http import ApprovalApi, HttpServer
from reconciler.keys import KeySpace
from reconciler.metrics import Metrics
from reconciler.store import EtcdStore

TOKEN = b"s3cret"
AUTH = {"Authorization": "Bearer s3cret"}


@dataclass
class Api:
    store: EtcdStore
    keys: KeySpace
    base: str
    session: aiohttp.ClientSession

    async def post(
        self, plan_id: str, action: str = "approve", *, body: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:  # fmt: skip
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else b"")
        url = f"{self.base}/v1/plans/{plan_id}/{action}"
        async with self.session.post(url, data=payload, headers=AUTH if headers is None else headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text), resp.headers

    async def seed(self, state: PlanState = PlanState.AWAITING_APPROVAL, name: str = "motd") -> PlanRecord:
        plan = ExecutionPlan(
            agent="file",
            resource=ResourceKey(kind="file", name=name),
            steps=(Step(tool="file.delete", parameters={"path": "/x"}, description="delete /x", risk=RiskLevel.HIGH),),
            desired_revision=7,
        )
        record = PlanRecord.start(plan, decision="approve")
        record.state = state
        await self.store.put(self.keys.plan(plan.id), record.model_dump_json().encode())
        return record

    async def approval(self, plan_id: str) -> Approval | None:
        kv = await self.store.get(self.keys.approval(plan_id))
        return None if kv is None else Approval.model_validate_json(kv.value)


@pytest.fixture
async def store(etcd: EmbeddedEtcd) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd.endpoint]) as s:
        yield s


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(f"/t-{uuid.uuid4().hex[:10]}")


async def _serve(approvals: ApprovalApi | None) -> HttpServer:
    server = HttpServer(listen="127.0.0.1:0", metrics=Metrics(), ready=lambda: "leader", approvals=approvals)
    await server.start()
    return server


@pytest.fixture
async def started() -> AsyncIterator[Callable[[ApprovalApi | None], Any]]:
    """Start servers with a given ApprovalApi; all are stopped at the end."""
    servers: list[HttpServer] = []

    async def start(approvals: ApprovalApi | None) -> str:
        server = await _serve(approvals)
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def api(store: EtcdStore, keys: KeySpace) -> AsyncIterator[Api]:
    server = await _serve(ApprovalApi(token=TOKEN, keys=keys, store=lambda: store))
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(store=store, keys=keys, base=f"http://127.0.0.1:{server.port}", session=session)
    finally:
        await server.stop()


# --- who may ask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}, {"Authorization": "s3cret"}],
    ids=["no-header", "wrong-token", "basic-scheme", "no-scheme"],
)
async def test_without_the_token_the_answer_is_401_and_nothing_is_written(api: Api, headers: dict[str, str]) -> None:
    record = await api.seed()
    status, body, resp_headers = await api.post(record.plan.id, headers=headers)
    assert status == 401
    assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert set(body) == {"error"} and body["error"]
    assert await api.approval(record.plan.id) is None


async def test_the_scheme_is_case_insensitive(api: Api) -> None:
    record = await api.seed()
    status, _, _ = await api.post(record.plan.id, headers={"Authorization": "bearer s3cret"})
    assert status == 200


async def test_without_a_configured_token_the_routes_answer_403_before_anything_else(
    store: EtcdStore, keys: KeySpace, started: Callable[[ApprovalApi | None], Any]
) -> None:
    base = await started(ApprovalApi(token=None, keys=keys, store=lambda: store))
    async with aiohttp.ClientSession() as session:
        for headers in ({}, AUTH):
            async with session.post(f"{base}/v1/plans/NOT_AN_ID/approve", data=b"{", headers=headers) as resp:
                assert resp.status == 403
                assert await resp.json() == {
                    "error": "HTTP approvals are off: set approvals.token_file or approvals.token_env"
                }


async def test_without_an_approval_api_the_routes_do_not_exist(
    started: Callable[[ApprovalApi | None], Any],
) -> None:
    base = await started(None)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/plans/abc/approve", headers=AUTH) as resp:
            assert resp.status == 404
        async with session.get(f"{base}/healthz") as resp:
            assert resp.status == 200


# --- which plan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("plan_id", ["no-such-plan", "Not_An_Id", "x" * 65])
async def test_an_unknown_or_malformed_plan_id_is_404(api: Api, plan_id: str) -> None:
    status, body, _ = await api.post(plan_id)
    assert status == 404
    assert set(body) == {"error"} and body["error"]
    assert await api.approval(plan_id) is None


async def test_a_plan_not_awaiting_approval_is_409(api: Api) -> None:
    record = await api.seed(PlanState.SUCCEEDED)
    status, body, _ = await api.post(record.plan.id)
    assert status == 409
    assert "succeeded" in body["error"]
    assert await api.approval(record.plan.id) is None


async def test_a_second_decision_while_the_first_waits_is_409_and_the_first_stays(api: Api) -> None:
    record = await api.seed()
    status, _, _ = await api.post(record.plan.id, body={"by": "alice"})
    assert status == 200
    status, body, _ = await api.post(record.plan.id, "reject", body={"by": "bob"})
    assert status == 409
    assert "already waiting" in body["error"]
    first = await api.approval(record.plan.id)
    assert first is not None and first.by == "alice" and first.decision is ApprovalDecision.APPROVE


# --- what is written -----------------------------------------------------------------------------


async def test_approve_writes_the_decision_with_the_records_hash(api: Api) -> None:
    record = await api.seed()
    status, body, _ = await api.post(record.plan.id, body={"by": "alice", "reason": "looked at it"})
    assert status == 200
    written = await api.approval(record.plan.id)
    assert written is not None
    assert written.decision is ApprovalDecision.APPROVE
    assert written.by == "alice"
    assert written.reason == "looked at it"
    assert written.plan_hash == record.plan_hash
    assert written.source == "http"
    assert body == {"plan_id": record.plan.id, "approval": written.model_dump(mode="json")}


async def test_an_empty_body_takes_the_defaults(api: Api) -> None:
    record = await api.seed()
    status, _, _ = await api.post(record.plan.id)
    assert status == 200
    written = await api.approval(record.plan.id)
    assert written is not None
    assert (written.by, written.reason, written.source) == ("http", "", "http")


async def test_reject_writes_a_rejection(api: Api) -> None:
    record = await api.seed()
    status, body, _ = await api.post(record.plan.id, "reject")
    assert status == 200
    assert body["approval"]["decision"] == "reject"
    written = await api.approval(record.plan.id)
    assert written is not None
    assert written.decision is ApprovalDecision.REJECT
    assert written.reason == "rejected through the HTTP API"
    assert written.plan_hash == record.plan_hash


async def test_a_decision_for_another_hash_is_refused_and_nothing_written(api: Api) -> None:
    """The caller reviewed another plan than the one waiting: 409, and nothing is written."""
    record = await api.seed()
    other = "0" * 64
    assert other != record.plan_hash
    status, body, _ = await api.post(record.plan.id, body={"plan_hash": other})
    assert status == 409
    assert "it is not the plan you reviewed" in body["error"]
    assert await api.approval(record.plan.id) is None
    status, body, _ = await api.post(record.plan.id, body={"plan_hash": record.plan_hash})
    assert status == 200 and body["approval"]["plan_hash"] == record.plan_hash


# --- what is refused -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "mentions"),
    [
        (b"{not json", "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[1, 2]", "object"),
        (b'"alice"', "object"),
        (b'{"by": "alice", "approve": true}', "approve"),
        (b'{"by": 7}', "by"),
        (b'{"reason": null}', "reason"),
        (b'{"by": ""}', "by"),
        (json.dumps({"by": "a" * 101}).encode(), "by"),
        (json.dumps({"reason": "r" * 501}).encode(), "reason"),
        (b'{"plan_hash": "abc"}', "plan_hash"),
        (json.dumps({"plan_hash": "A" * 64}).encode(), "plan_hash"),
        (b"[" * 20_000 + b"]" * 20_000, "JSON"),
    ],
    ids=[
        "bad-json", "not-utf8", "array", "string", "unknown-field", "by-not-string", "reason-null", "by-empty",
        "by-too-long", "reason-too-long", "short-hash", "uppercase-hash", "deep-nesting",
    ],
)  # fmt: skip
async def test_a_bad_body_is_400_naming_what_is_wrong(api: Api, data: bytes, mentions: str) -> None:
    record = await api.seed()
    status, body, _ = await api.post(record.plan.id, data=data)
    assert status == 400, body
    assert set(body) == {"error"} and mentions in body["error"]
    assert await api.approval(record.plan.id) is None


async def test_a_body_over_64_kib_is_refused(api: Api) -> None:
    record = await api.seed()
    data = json.dumps({"reason": "r" * (65 * 1024)}).encode()
    status, body, _ = await api.post(record.plan.id, data=data)
    assert status == 413
    assert "64 KiB" in body["error"]
    assert await api.approval(record.plan.id) is None


# --- when etcd is not there ----------------------------------------------------------------------


async def test_before_etcd_is_connected_the_answer_is_503(
    keys: KeySpace, started: Callable[[ApprovalApi | None], Any]
) -> None:
    base = await started(ApprovalApi(token=TOKEN, keys=keys, store=lambda: None))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/plans/abc/approve", headers=AUTH) as resp:
            assert resp.status == 503
            assert await resp.json() == {"error": "not connected to etcd yet"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["unreachable", "not-connected"])
async def test_a_failing_store_is_503_with_a_sentence(
    keys: KeySpace, started: Callable[[ApprovalApi | None], Any], kind: str
) -> None:
    if kind == "unreachable":
        store = EtcdStore([f"127.0.0.1:{_closed_port()}"], timeout=0.5, retry_attempts=1)
        await store.connect()
    else:
        store = EtcdStore(["127.0.0.1:2379"])  # never connected: the store refuses every request
    try:
        base = await started(ApprovalApi(token=TOKEN, keys=keys, store=lambda: store))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v1/plans/abc/approve", headers=AUTH) as resp:
                assert resp.status == 503
                body = await resp.json()
                assert set(body) == {"error"} and "etcd" in body["error"]
                assert "Traceback" not in body["error"]
    finally:
        await store.close()
