"""The etcd adapter: the only module that imports the etcd client (reconciler/channel.py builds its channel).

It speaks in plain data (`KeyValue`, `WatchBatch`) and a small error
vocabulary so the rest of the reconciler never sees gRPC. Unary calls go
through etcd3aio's services (which retry UNAVAILABLE / DEADLINE_EXCEEDED up
to `retry_attempts` times within the request timeout), each try on the next
member of the cluster that is up (reconciler/channel.py). The watch is driven on
the raw Watch stub instead of etcd3aio's `watch()`, because that helper
silently resumes at `compact_revision + 1` after a compaction, which loses
updates; here a compaction ends the stream with `WatchCompactedError` and the
caller relists.

A watch stream can also go quiet without failing: a frozen etcd process, or
a half-open TCP connection, answers nothing and reports no error. So the
stream asks for a progress notification whenever it has been silent for a
while, and gives up with `WatchStalledError` when not even that is answered.

Fencing. `fenced(fence)` is a view of the store, sharing its client, whose
every write (`put`, `delete`, `put_all`, `txn`) is one transaction that
first compares the leader key's create revision with the one this daemon
won (`Fence`); the caller's own transaction, guards and both branches, is
nested inside it. When the comparison fails, etcd applies nothing and the
write raises `LeadershipLostError`; when `fence()` says there is no fence
(the daemon stands by, or its leadership lapsed), nothing is sent at all.
So a leader that was paused past its lease and wakes up can write nothing:
the key it created is gone or someone else's, whatever it believes. Reads
and watches are the same in the view. Nested transactions need etcd 3.3 or
newer. The lease calls (`grant_lease`, `keepalive`, `revoke_lease`,
`put_leased`, `create`) are what the election (`election.py`) needs.
With TLS the channel verifies etcd's certificate against the given CA and
may present a client certificate. With credentials, every request and stream
carries the user's token (`etcd_auth.TokenKeeper` keeps it live): `_call`
gets the first one before the first request, and when etcd calls a token
invalid it renews it (one renewal for all callers) and retries the request
once, as clientv3's unary interceptor does. etcd refuses a request it did not
authenticate before running it, so the retry cannot apply a write twice. An
open watch is not affected by its token expiring (etcd checks it when the
watch is created); a watch created with a dead one is cancelled as
"permission denied", like one the user may not read, and `watch` tells the
two apart by reading the same range once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio
import structlog
from etcd3aio import (
    Etcd3Client,
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import (
    Compare,
    LeaseKeepAliveRequest,
    LeaseStub,
    RequestOp,
    TxnRequest,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)

from plans import TemporaryError
from reconciler.channel import MemberConnections, with_leader
from reconciler.etcd_auth import (
    Credentials,
    TlsMaterial,
    TokenKeeper,
    asks_new_token,
    handshake_failure,
    refusal,
    who,
)

__all__ = ["Credentials", "TlsMaterial"]  # re-exported: what an EtcdStore is built with

log = structlog.get_logger("setpoint.store")

# Writes are retried by `_write`, not by etcd3aio, which cannot tell what a resent write's answer means. etcd
# answers UNAVAILABLE ("request timed out", "leader changed", a member dying after the commit) for writes that may
# have been applied; sent again, a guarded one would find its own write and answer "refused", a definite no where
# the truth is "it landed". So a guarded write resent after such an answer, and then refused, is
# StoreUnavailableError ("unknown"), which every caller already handles. A refusal that proves the write never
# went out (NEVER_SENT, as clientv3's isSafeRetryMutableRPC) leaves no doubt.
ONCE = 1
# gRPC's and etcd's words for a request that was refused before it was sent or proposed.
NEVER_SENT = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "no address",
    "no connection",
    "etcdserver: no leader",
)
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_REQUEST_BYTES = 1_500_000  # etcd's default --max-request-bytes (1.5 MiB)
# Fenced writes sent together in one request (`_Batches`): at most this many (etcd counts a transaction's
# operations at each level of nesting against --max-txn-ops), of at most this many bytes in all, unless one
# alone is larger (it then goes alone, as it would have).
MAX_BATCH = 64
MAX_BATCH_BYTES = MAX_REQUEST_BYTES // 2
SHARED_MAX_OPS = MAX_TXN_OPS - MAX_BATCH - 1  # a write of more goes alone: etcd leaves a nested one 128 - its parent's
# A range is read in pages sized by what the last one weighed: PAGE_BYTES a page, PAGE_KEYS at most (etcd
# counts the rest of the range for every page, so 500-key pages made a list of 100,000 keys quadratic: 4.4 to 6.1 s
# against 1.0 to 1.35 s in pages of 5,000). The first page is PAGE_FIRST keys, as before.
PAGE_FIRST = 500
PAGE_KEYS = 10_000
PAGE_BYTES = 8 * 1024 * 1024
# A page or watch response may carry many values of up to 1.5 MiB each; gRPC's
# default 4 MiB receive limit would turn a large but valid key space into an error.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024
# While etcd is down, gRPC fails every call at once and retries the connection
# on its own backoff, which by default grows to 120 s: after a long outage the
# daemon would sit idle for up to two minutes with etcd back (measured: 2-4 s
# after a 3-6 s outage). One connection attempt a second is cheap.
RECONNECT_BACKOFF_INITIAL_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1_000


class StoreError(Exception):
    """etcd refused or failed a request for a reason retrying will not fix."""


class LeadershipLostError(StoreError):
    """A fenced write was refused, or not sent: this daemon does not lead (any more), so it may write nothing."""


class StoreAccessError(StoreError):
    """etcd refused who we are or what we asked for: a wrong password, a missing permission, or no user."""


class StoreUnavailableError(TemporaryError):
    """etcd could not be reached or did not answer in time."""


class WatchStalledError(StoreUnavailableError):
    """The watch stream answered nothing, not even a progress request, for `silent_for` seconds."""

    def __init__(self, silent_for: float) -> None:
        super().__init__(f"watch stream answered nothing for {silent_for:g} s")
        self.silent_for = silent_for


class WatchCompactedError(Exception):
    """The watch start revision has been compacted away; relist at a fresh revision."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


class _TokenRefused(Exception):
    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 0
    lease: int = 0  # the id of the lease the key is attached to (0: none)


@dataclass(frozen=True, slots=True)
class Fence:
    """A fencing token: the leader key, and the create revision it had when this daemon created it."""

    key: str
    create_revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds, as etcd granted it (etcd raises a TTL below its minimum)


@dataclass(frozen=True, slots=True)
class Created:
    """The result of `create`: whether this call created the key, and the key as it is now (None: absent)."""

    created: bool
    kv: KeyValue | None
    revision: int  # the store's revision when this was true


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Guard:
    """A transaction's condition: `key`'s mod_revision is `mod_revision` (0: the key is absent)."""

    key: str
    mod_revision: int


def request_bytes(ops: Sequence[Op]) -> int:
    """A safe over-estimate of the size of a request carrying `ops`."""
    return 256 + sum(len(op.key) + (len(op.value) if isinstance(op, Put) else 0) + 32 for op in ops)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response after the stream was created.

    `events` is empty for a progress notification or the answer to a progress
    request. `revision` is the response header's revision. `progress` is True
    only when the response proves that every change in the watched range up
    to `revision` has been delivered, so the watch may resume after it (see
    `EtcdStore.watch`).
    """

    events: tuple[WatchEvent, ...]
    revision: int
    progress: bool = False


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=bytes(pb.key),
        value=bytes(pb.value),
        mod_revision=pb.mod_revision,
        create_revision=pb.create_revision,
        version=pb.version,
        lease=pb.lease,
    )


def range_end(prefix: bytes) -> bytes:
    return bytes(prefix_range_end(prefix))


def _text(key: bytes) -> str:
    """A key as it reads in an error: bytes' repr without b'' (so "/setpoint/x", "\\x00")."""
    return repr(key)[2:-1]


def _unknown(what: str) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"etcd's answer to {what} was lost, and sent again it was refused: the first may have been applied"
    )


def _never_sent(error: BaseException) -> bool:
    """True when `error` (or what caused it) is a gRPC UNAVAILABLE saying the request never reached etcd, or
    that etcd refused it before proposing it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, grpc.aio.AioRpcError) and seen.code() == grpc.StatusCode.UNAVAILABLE:
            details = (seen.details() or "").lower()
            return any(words in details for words in NEVER_SENT)
        seen = seen.__cause__
    return False


# What a request is, for an error about it: a text, or what makes one (only called when there is an error).
What = str | Callable[[], str]


def _txn_what(written: Sequence[str]) -> str:
    """A transaction named by its keys, for a permission error."""
    keys = list(dict.fromkeys(written))
    if not keys:
        return "run a transaction"
    more = f" and {len(keys) - 1} more keys" if len(keys) > 1 else ""
    return f"run a transaction on {keys[0]}{more}"


class EtcdStore:
    """An async etcd client bound to endpoints; use as `async with EtcdStore(...)`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 10.0,
        retry_attempts: int = 3,
        tls: TlsMaterial | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """`timeout` bounds one request, retries included; `retry_attempts` is how many
        times a request is tried on UNAVAILABLE / DEADLINE_EXCEEDED. Defaults: 10 s, 3.
        `tls`: talk TLS (default plain text); `credentials`: authenticate as that user (default: no user)."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self._timeout = timeout
        self._retry_attempts = retry_attempts
        self._tls = tls
        self._credentials = credentials
        self._token = TokenKeeper(self._authenticate) if credentials is not None else None
        self._renewer: asyncio.Task[None] | None = None
        self._client = Etcd3Client(
            self.endpoints,
            rpc_max_attempts=retry_attempts,
            ca_cert=tls.ca_cert if tls is not None else None,  # None: plain text
            cert_chain=tls.cert_chain if tls is not None else None,
            cert_key=tls.cert_key if tls is not None else None,
            tls_server_name=tls.server_name if tls is not None else None,
        )
        # One channel per member instead of etcd3aio's `ipv4:` target: host names, failover (see channel.py).
        self._connections = self._client._manager = MemberConnections(self.endpoints)
        # etcd3aio builds its channel from these options and offers no parameter for them.
        self._connections.grpc_options.extend(
            [
                ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
            ]
        )
        self._connected = False
        self._batches = _Batches()

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open a channel to every member; returns once one is up, or every one has failed, or after the
        request timeout."""
        await self._client.connect()
        self._connected = True
        if self._connections.channels is not None:
            await self._connections.channels.settle(self._timeout)
        if self._token is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._token.run(), name="etcd-token")

    async def close(self) -> None:
        await self._batches.close()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._connected:
            self._connected = False
            await self._client.close()

    @property
    def _kvs(self) -> Any:
        if self._client.kv is None:
            raise StoreError("etcd client is not connected")
        return self._client.kv

    async def _write(
        self, request: Callable[[], Awaitable[Any]], *, what: What, timeout: float | None = None
    ) -> tuple[Any, bool]:
        """`_call` for a write, tried up to `retry_attempts` times on UNAVAILABLE; the answer, and whether an
        earlier try may have been applied (its answer was lost after it was sent: anything but NEVER_SENT). The
        caller decides what a resent write's answer means: the same put again is harmless, but a guarded one would
        find its own write and answer "refused"."""
        delay = 0.05
        resent = False
        timeout = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):  # `timeout` bounds the request, its retries included
                for attempt in range(self._retry_attempts):
                    try:
                        return await self._call(request, what=what), resent
                    except StoreUnavailableError as e:
                        if attempt + 1 == self._retry_attempts:
                            raise
                        resent = resent or not _never_sent(e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        except TimeoutError as e:
            raise StoreUnavailableError(f"etcd at {self._where} did not answer within {self._timeout:g} s") from e
        raise AssertionError("unreachable")

    async def _call(self, request: Callable[[], Awaitable[Any]], *, what: What = "") -> Any:
        """`request()`'s answer, errors mapped to ours. With credentials the token goes along; a token etcd
        calls invalid is renewed and the request made once more. `what` (e.g. "read /setpoint/x") names the
        request in a permission error."""
        if self._token is None:
            return await self._call_once(request, what)
        token = await self._token.ensure()
        try:
            return await self._call_once(request, what, token)
        except _TokenRefused:
            token = await self._token.renew(token)
        try:
            return await self._call_once(request, what, token)
        except _TokenRefused as e:
            user = who(self._credentials, self._tls)
            raise StoreAccessError(f"etcd at {self._where} refused the new auth token of {user}: {e.details}") from e

    async def _call_once(self, request: Callable[[], Awaitable[Any]], what: What, token: str | None = None) -> Any:
        if token is not None:
            self._use_token(token)
        try:
            return await request()
        except TimeoutError as e:
            raise StoreUnavailableError(f"etcd at {self._where} did not answer within {self._timeout:g} s") from e
        except (EtcdConnectionError, EtcdTransientError) as e:
            reason = str(e) or type(e).__name__
            reason = handshake_failure(reason, self._tls) or reason
            raise StoreUnavailableError(f"etcd at {self._where} is unavailable: {reason}") from e
        except (EtcdUnauthenticatedError, EtcdPermissionDeniedError) as e:
            cause = e.__cause__
            details = cause.details() if isinstance(cause, grpc.aio.AioRpcError) else str(e)
            raise self._refusal(details or str(e), what) from e
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailableError(f"etcd is unavailable: {e.code().name}") from e
            if asks_new_token(e.details() or ""):
                raise self._refusal(e.details(), what) from e
            raise StoreError(f"etcd refused the request: {e.code().name}: {e.details()}") from e
        except EtcdError as e:
            raise StoreError(str(e)) from e

    @property
    def _where(self) -> str:
        return ",".join(self.endpoints)

    def _refusal(self, details: str, what: What) -> Exception:
        """What etcd's refusal `details` means: a token to renew, or a StoreAccessError saying what to fix."""
        if not isinstance(what, str):
            what = what()
        if asks_new_token(details) and self._credentials is not None:
            return _TokenRefused(details)
        user = who(self._credentials, self._tls)
        credentials = self._credentials is not None
        return StoreAccessError(refusal(details, what=what, user=user, where=self._where, credentials=credentials))

    def _use_token(self, token: str) -> None:
        """Send `token` with every unary request from now on. Not on Auth: an Authenticate carrying a dead token
        fails on etcd before 3.4.14 / 3.3.25 (etcd PR 12165), and clientv3 clears it for the same reason."""
        client = self._client
        for service in (client.kv, client.lease, client.maintenance, client.cluster, client.watch):
            if service is not None:
                service.set_token(token or None)

    async def _authenticate(self) -> str:
        """A new token for the credentials; "" when etcd has authentication off (clientv3 carries on too)."""
        assert self._credentials is not None
        auth, user = self._client.auth, self._credentials
        if auth is None:
            raise StoreError("etcd client is not connected")
        try:
            resp = await self._call_once(
                lambda: auth.authenticate(user.username, user.password, timeout=self._timeout), "authenticate"
            )
        except StoreError as e:
            if "authentication is not enabled" in str(e):
                return ""
            if "invalid user ID or password" in str(e):
                raise self._refusal("invalid user ID or password", "authenticate") from e
            raise
        return str(resp.token)

    def _stream_metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata every stream this client opens carries: the current auth token, if any. Await
        `_token.ensure()` first (as `watch` does) so that a stream opened before any request has one."""
        token = self._token.token if self._token is not None else None
        return (("token", token),) if token else ()

    async def ping(self, key: bytes = b"\x00") -> int:
        """The cluster's current revision; raises StoreUnavailableError when etcd does not answer. It reads
        (counts) `key`: with authentication on, give one the user may read."""
        resp = await self._call(
            lambda: self._kvs.get(key, count_only=True, timeout=self._timeout), what=f"read {_text(key)}"
        )
        return int(resp.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(lambda: self._kvs.get(key.encode(), timeout=self._timeout), what=f"read {key}")
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, start: bytes, end: bytes, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        """Every key in [start, end) at one revision (the current one when 0), read in pages."""
        items: list[KeyValue] = []
        key = start
        limit = PAGE_FIRST
        while True:
            resp = await self._call(
                functools.partial(self._kvs.get, key, end, revision=revision, limit=limit, timeout=self._timeout),
                what=f"read {_text(start)} to {_text(end)}",
            )
            if revision == 0:
                revision = int(resp.header.revision)
            items.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return items, revision
            key = bytes(resp.kvs[-1].key) + b"\x00"
            per_key = max(1, resp.ByteSize() // len(resp.kvs))
            limit = max(1, min(PAGE_KEYS, PAGE_BYTES // per_key))

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        start = prefix.encode()
        return await self.range(start, range_end(start))

    def fenced(self, fence: Callable[[], Fence | None]) -> EtcdStore:
        """A view of this store, on the same client, whose every write is fenced by `fence()` (see the module
        docstring); None from `fence()` means this daemon does not lead, and its writes raise
        LeadershipLostError without reaching etcd."""
        view = _FencedStore(fence)
        view.__dict__ = self.__dict__  # one client, one connection, one set of credentials: a view, not a copy
        return view

    def _fence_now(self) -> Fence | None:
        """The fence a write of this store must hold; None for an unfenced store. Raises LeadershipLostError
        when this is a fenced view whose fence is gone."""
        return None

    def fence_holds(self) -> bool:
        """False when this is a fenced view whose fence is gone (the daemon does not lead); asks nobody."""
        try:
            self._fence_now()
        except LeadershipLostError:
            return False
        return True

    async def put(self, key: str, value: bytes) -> int:
        fence = self._fence_now()
        if fence is None:
            resp, _ = await self._write(  # the same value again, if the first try landed: harmless
                lambda: self._kvs.put(key.encode(), value, timeout=self._timeout, max_attempts=ONCE),
                what=f"write {key}",
            )
            return int(resp.header.revision)
        _, revision, _ = await self._commit([], self._ops([Put(key, value)]), [], fence=fence, keys=[key])
        return revision

    async def delete(self, key: str) -> bool:
        fence = self._fence_now()
        if fence is None:
            resp, resent = await self._write(
                lambda: self._kvs.delete(key.encode(), timeout=self._timeout, max_attempts=ONCE), what=f"delete {key}"
            )
            deleted = int(resp.deleted) > 0
        else:
            inner, _, resent = await self._commit([], self._ops([Delete(key)]), [], fence=fence, keys=[key])
            deleted = int(inner.responses[0].response_delete_range.deleted) > 0
        if resent and not deleted:  # gone now, but maybe by the try whose answer was lost
            raise _unknown(f"delete {key}")
        return deleted

    async def put_all(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Write every item in one transaction (so all or none land); at most MAX_TXN_OPS items."""
        if len(items) > MAX_TXN_OPS:
            raise StoreError(f"{len(items)} writes exceed etcd's {MAX_TXN_OPS} operations per transaction")
        ops = self._ops([Put(key, value) for key, value in items])
        _, revision, _ = await self._commit([], ops, [], fence=self._fence_now(), keys=[key for key, _ in items])
        return revision

    async def txn(
        self,
        *,
        guard: Guard | Sequence[Guard] | None = None,
        then: Sequence[Op] = (),
        otherwise: Sequence[Op] = (),
    ) -> bool:
        """One transaction: `then` if every guard holds (or there is none), else `otherwise`; True when `then` ran."""
        guards = [] if guard is None else [guard] if isinstance(guard, Guard) else list(guard)
        compare = [
            Compare(result=Compare.EQUAL, target=Compare.MOD, key=g.key.encode(), mod_revision=g.mod_revision)
            for g in guards
        ]
        keys = [g.key for g in guards] + [op.key for op in (*then, *otherwise)]
        inner, _, resent = await self._commit(
            compare, self._ops(then), self._ops(otherwise), fence=self._fence_now(), keys=keys
        )
        if resent and guards and not inner.succeeded:  # refused, maybe because the try whose answer was lost landed
            raise _unknown(_txn_what(keys))
        return bool(inner.succeeded)

    async def _commit(
        self, compare: list[Any], then: list[Any], otherwise: list[Any], *, fence: Fence | None, keys: Sequence[str]
    ) -> tuple[Any, int, bool]:
        """Send one transaction, nested inside `fence`'s comparison unless it is None; the response of the
        caller's transaction, the store's revision after it, and whether it was resent after a lost answer
        (`_write`). `keys` (those it compares and writes) name the transaction in errors."""
        what = functools.partial(_txn_what, keys)  # built only for an error: not on every write
        if fence is None:
            resp, resent = await self._write(self._send_txn(TxnRequest(compare=compare, success=then,
                                                                      failure=otherwise)), what=what)  # fmt: skip
            return resp, int(resp.header.revision), resent
        nested = RequestOp(request_txn=TxnRequest(compare=compare, success=then, failure=otherwise))
        return await self._batches.send(self, fence, nested, keys=keys, what=what)

    async def _send_fenced(self, fence: Fence, batch: Sequence[_Batched], *, timeout: float) -> tuple[Any, bool]:
        """Send the transactions of `batch` in one request, each nested in `fence`'s comparison; etcd's answer,
        and whether it was resent (`_write`). LeadershipLostError, naming the first one's first key, when the
        fence does not hold."""
        held = Compare(
            result=Compare.EQUAL, target=Compare.CREATE, key=fence.key.encode(), create_revision=fence.create_revision
        )
        request = TxnRequest(compare=[held], success=[item.nested for item in batch])
        resp, resent = await self._write(self._send_txn(request, timeout=timeout), what=batch[0].what, timeout=timeout)
        if not resp.succeeded:
            written = next(iter(batch[0].keys), "nothing")
            raise LeadershipLostError(
                f"etcd refused the write of {written}: {fence.key} is no longer the key this daemon created at "
                f"revision {fence.create_revision}, so another daemon leads or none does"
            )
        return resp, resent

    def _send_txn(self, request: Any, *, timeout: float | None = None) -> Callable[[], Awaitable[Any]]:
        """A request sending `request` once, as etcd3aio's `txn(..., max_attempts=ONCE)` would, errors mapped as it
        maps them, without its retry loop and the timer it sets around every call: `_write` bounds the request and
        its retries with a timer of its own, and gRPC's deadline bounds each try. One timer a write, not two."""
        kvs = self._kvs

        deadline = self._timeout if timeout is None else timeout

        async def send() -> Any:
            try:
                return await kvs._stub.Txn(request, metadata=kvs._metadata or None, timeout=deadline)
            except grpc.aio.AioRpcError as e:
                kvs._raise_rpc_exception(e, "KV.Txn", attempts=ONCE)

        return send

    def _ops(self, ops: Sequence[Op]) -> list[Any]:
        kvs = self._kvs
        return [
            kvs.txn_op_put(op.key.encode(), op.value) if isinstance(op, Put) else kvs.txn_op_delete(op.key.encode())
            for op in ops
        ]

    # -- leases (the election's; never fenced) ----------------------------------------------------------------

    @property
    def _leases(self) -> Any:
        if self._client.lease is None:
            raise StoreError("etcd client is not connected")
        return self._client.lease

    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds (etcd may grant more: it raises a TTL below its minimum)."""
        leases = self._leases
        resp = await self._call(lambda: leases.grant(ttl, timeout=self._timeout), what="grant a lease")
        return Lease(id=int(resp.ID), ttl=int(resp.TTL))

    async def keepalive(self, lease_id: int) -> int:
        """Renew `lease_id` once (one round trip on a keepalive stream); its TTL now, or 0 when it is gone."""
        if self._token is not None:
            await self._token.ensure()  # the stream carries the token it has now
        call = LeaseStub(self._client._channel).LeaseKeepAlive(
            _one(LeaseKeepAliveRequest(ID=lease_id)), metadata=self._stream_metadata() or None
        )
        try:
            async with asyncio.timeout(self._timeout):
                async for resp in call:
                    return max(int(resp.TTL), 0)
        except TimeoutError:
            raise StoreUnavailableError(
                f"etcd at {','.join(self.endpoints)} did not renew lease {lease_id:x} within {self._timeout:g} s"
            ) from None
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailableError(f"etcd is unavailable: {e.code().name}") from e
            raise StoreError(f"etcd refused to renew lease {lease_id:x}: {e.code().name}: {e.details()}") from e
        finally:
            call.cancel()
        raise StoreUnavailableError(f"etcd closed the keepalive stream of lease {lease_id:x} without an answer")

    async def revoke_lease(self, lease_id: int) -> bool:
        """Revoke `lease_id`, deleting every key attached to it; False when etcd no longer knows it."""
        try:
            leases = self._leases
            await self._call(lambda: leases.revoke(lease_id, timeout=self._timeout), what=f"revoke lease {lease_id:x}")
        except StoreError as e:
            cause = e.__cause__
            if isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def put_leased(self, key: str, value: bytes, *, lease: int) -> int:
        """Put `key` attached to `lease` (it goes when the lease does); never fenced. The store's revision."""
        resp, _ = await self._write(
            lambda: self._kvs.put(key.encode(), value, lease=lease, timeout=self._timeout, max_attempts=ONCE),
            what=f"write {key}",
        )
        return int(resp.header.revision)

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> Created:
        """Put `key` attached to `lease` only if it does not exist (its create revision is 0); never fenced."""
        kvs = self._kvs
        absent = Compare(result=Compare.EQUAL, target=Compare.CREATE, key=key.encode(), create_revision=0)
        read = kvs.txn_op_get(key.encode())
        then = [kvs.txn_op_put(key.encode(), value, lease=lease), read]
        # Resent after a lost answer, a create this try made shows as not created with the caller's lease: the
        # election tells them apart by the lease.
        resp, _ = await self._write(
            lambda: kvs.txn([absent], then, [read], timeout=self._timeout, max_attempts=ONCE),
            what=f"run a transaction on {key}",
        )
        found = resp.responses[-1].response_range.kvs
        return Created(created=bool(resp.succeeded), kv=_kv(found[0]) if found else None,
                       revision=int(resp.header.revision))  # fmt: skip

    async def server_version(self) -> str:
        """The etcd version of the member this client talks to."""
        if self._client.maintenance is None:
            raise StoreError("etcd client is not connected")
        maintenance = self._client.maintenance
        resp = await self._call(lambda: maintenance.status(timeout=self._timeout))
        return str(resp.version)

    async def compact(self, revision: int) -> None:
        await self._call(lambda: self._kvs.compact(revision, physical=True, timeout=self._timeout))

    async def watch(
        self,
        start: bytes,
        end: bytes,
        *,
        start_revision: int,
        progress_after: float | None = None,
        stall_after: float | None = None,
    ) -> AsyncGenerator[WatchBatch, None]:
        """Stream changes to [start, end) from `start_revision`, with progress notifications. Without the
        previous values (prev_kv): nothing reads them, and etcd would fetch and send one for every event.

        After `progress_after` seconds without a response a progress request
        is sent (and again after each further such silence); after
        `stall_after` seconds without any response the stream ends with
        WatchStalledError. None disables either. Ends with WatchCompactedError
        when `start_revision` was compacted, StoreUnavailableError on transport
        failure; never resumes by itself.

        The stream goes to one member, and requires it to have a leader: a member
        cut off from its quorum cancels it (UNAVAILABLE "no leader").
        """
        members = self._connections.channels
        if self._client.watch is None or members is None:
            raise StoreError("etcd client is not connected")
        member = members.pick()
        if self._token is not None:
            await self._token.ensure()  # the first token, or the StoreError saying why there is none
        create = WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, progress_notify=True
        )
        heard = asyncio.Event()  # set on every response; the request side times its progress requests by it
        call = WatchStub(member.channel).Watch(
            self._watch_requests(create, heard, progress_after), metadata=with_leader(self._stream_metadata())
        )
        responses = call.__aiter__()
        watch_id: int | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout(stall_after):
                        resp = await anext(responses)
                except StopAsyncIteration:
                    raise StoreUnavailableError(f"etcd at {member.endpoint} closed the watch stream") from None
                except TimeoutError:
                    raise WatchStalledError(stall_after or 0.0) from None
                heard.set()
                if resp.compact_revision > 0:
                    raise WatchCompactedError(int(resp.compact_revision))
                if resp.canceled:
                    if "permission denied" in resp.cancel_reason:
                        await self._may_watch(start, end)
                    raise StoreUnavailableError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.created:
                    watch_id = int(resp.watch_id)
                    # Which member serves the watch, so that operators can follow a failover.
                    log.info(
                        "watch.connected",
                        endpoint=member.endpoint,
                        member_id=f"{resp.header.member_id:x}",
                        key=start.decode("utf-8", "replace"),
                        start_revision=start_revision,
                    )
                    if not resp.events:
                        continue
                yield self._batch(resp, watch_id)
        except grpc.aio.AioRpcError as e:
            raise StoreUnavailableError(
                f"watch stream on etcd at {member.endpoint} failed: {e.code().name}: {e.details()}"
            ) from e
        finally:
            call.cancel()

    async def _may_watch(self, start: bytes, end: bytes) -> None:
        """After etcd refused a watch on [start, end) as "permission denied": raise StoreAccessError when the user
        may not read that range; else the watch's token had expired, and reading renewed it for the next watch."""
        await self._call(
            lambda: self._kvs.get(start, end, count_only=True, timeout=self._timeout),
            what=f"watch {_text(start)} to {_text(end)}",
        )

    @staticmethod
    async def _watch_requests(create: Any, heard: asyncio.Event, progress_after: float | None) -> AsyncIterator[Any]:
        """The request side of one watch stream: the create request, then a progress request
        after each `progress_after` seconds in which `heard` was not set; open until cancelled."""
        yield WatchRequest(create_request=create)
        while True:
            heard.clear()
            try:
                await asyncio.wait_for(heard.wait(), progress_after)
            except TimeoutError:
                request = WatchRequest()
                request.progress_request.SetInParent()  # an empty WatchProgressRequest
                yield request

    @staticmethod
    def _batch(resp: Any, watch_id: int | None) -> WatchBatch:
        events = tuple(
            WatchEvent(
                type="delete" if ev.type == 1 else "put",
                kv=_kv(ev.kv),
            )
            for ev in resp.events
        )
        # An empty response is one of two things, told apart by its watch id.
        # - Our watcher's own progress notification (watch id = ours, from
        #   `progress_notify`): etcd sends it only to a *synced* watcher, under
        #   the store lock and through the same channel as that watcher's events,
        #   so every change up to the header revision has been delivered before
        #   it. Resuming after that revision loses nothing.
        # - The answer to a progress request (watch id -1): etcd before 3.5.8
        #   (and the 3.5.1 we embed) answers it at once with the store's current
        #   revision, on a separate control channel, even while the watcher is
        #   still catching up on history or has events queued (etcd issue
        #   15220). Resuming after that revision could skip those events, so it
        #   only proves the stream is alive.
        progress = not events and watch_id is not None and int(resp.watch_id) == watch_id
        return WatchBatch(events=events, revision=int(resp.header.revision), progress=progress)


@dataclass(slots=True)
class _Batched:
    """A fenced transaction waiting in `_Batches` for its request."""

    nested: Any  # the caller's transaction, as a RequestOp
    keys: Sequence[str]  # those it compares and writes, to name it in an error
    reads: set[bytes]  # the keys it compares
    writes: set[bytes]  # the keys it puts or deletes
    alone: bool  # too many operations to share a request (etcd counts a nested one's against what its parent leaves)
    what: What
    size: int
    deadline: float  # loop time by which its answer is due (the store's request timeout)
    future: asyncio.Future[tuple[Any, int, bool]]


class _Batches:
    """Group commit of the fenced writes: those that arrive while a request is out go together in the next.

    Each write is still its own transaction, with its own guards and both its branches, nested beside the
    others inside the fence's comparison; etcd answers each one's `succeeded`, and applies them all at one
    revision. With one write at a time nothing waits: it goes at once, alone, as before. Under load, the
    workers' begin and settle writes share requests (and etcd's proposals) instead of each paying a gRPC
    call. What one after the other would guarantee still holds:

    - two writes never share a request when one writes a key the other compares or writes: etcd evaluates
      every nested transaction's guards before applying any, so sharing would let both of two guarded writes
      that read what the other writes succeed (and etcd refuses a request that writes one key twice);
    - no write overtakes one queued before it that touches one of its keys: a write left for a later request
      holds back every later write on its keys;
    - a write of more than SHARED_MAX_OPS operations goes alone, as do the writes queued after it meanwhile:
      etcd allows a nested transaction only the operations its parent leaves;
    - a request etcd refuses (a write too large, a permission one key lacks) was applied in nothing, and its
      writes are sent again one by one, so that only the write at fault fails;
    - a request that fails otherwise (etcd unavailable, the fence gone) fails every write in it alike.

    A write whose caller gave up while it waited is not sent; one whose request timeout passed while it
    waited fails as never sent; a request's own timeout is its earliest write's."""

    def __init__(self) -> None:
        self._queues: dict[Fence, list[_Batched]] = {}
        self._drains: dict[Fence, asyncio.Task[None]] = {}

    async def send(
        self, store: EtcdStore, fence: Fence, nested: Any, *, keys: Sequence[str], what: What
    ) -> tuple[Any, int, bool]:
        loop = asyncio.get_running_loop()
        txn = nested.request_txn
        reads = {c.key for c in txn.compare}
        writes = {op.request_put.key or op.request_delete_range.key for op in (*txn.success, *txn.failure)}
        ops = max(len(txn.compare), len(txn.success), len(txn.failure))
        item = _Batched(
            nested, keys, reads, writes, ops > SHARED_MAX_OPS, what, nested.ByteSize(), loop.time() + store._timeout,
            loop.create_future(),
        )  # fmt: skip
        self._queues.setdefault(fence, []).append(item)
        if fence not in self._drains:  # in a context of its own: not the log context of the write that started it
            self._drains[fence] = loop.create_task(
                self._drain(store, fence), name="etcd-writes", context=contextvars.Context()
            )
        return await item.future

    async def close(self) -> None:
        drains = list(self._drains.values())
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)

    async def _drain(self, store: EtcdStore, fence: Fence) -> None:
        queue = self._queues[fence]
        batch: list[_Batched] = []
        try:
            while queue:
                batch, queue[:] = self._next(queue)
                await self._flush(store, fence, batch)
        except asyncio.CancelledError:
            closed = StoreUnavailableError("the etcd client was closed before this write was answered")
            for item in [*batch, *queue]:
                if not item.future.done():
                    item.future.set_exception(closed)
            raise
        finally:
            del self._drains[fence]
            if not queue:
                del self._queues[fence]

    @staticmethod
    def _next(queue: list[_Batched]) -> tuple[list[_Batched], list[_Batched]]:
        """The writes of the next request, in the order they were queued, and those left for later."""
        batch: list[_Batched] = []
        left: list[_Batched] = []
        reads: set[bytes] = set()  # keys the batch compares
        writes: set[bytes] = set()  # keys it writes
        held_reads: set[bytes] = set()  # the same, of the writes left for later: a write after them that
        held_writes: set[bytes] = set()  # conflicts with one of them waits too
        after_alone = False  # a write that goes alone was left for later: every write after it waits
        size = 0
        for item in queue:
            if item.future.done():
                continue  # its caller gave up before it was sent
            shares = not batch or (
                not item.alone and not batch[0].alone and len(batch) < MAX_BATCH and size + item.size <= MAX_BATCH_BYTES
            )
            if shares and not after_alone and not _conflict(item, reads, writes, held_reads, held_writes):
                batch.append(item)
                size += item.size
                reads |= item.reads
                writes |= item.writes
            else:
                left.append(item)
                held_reads |= item.reads
                held_writes |= item.writes
                after_alone = after_alone or item.alone
        return batch, left

    @classmethod
    async def _flush(cls, store: EtcdStore, fence: Fence, batch: list[_Batched]) -> None:
        now = asyncio.get_running_loop().time()
        for item in batch:
            if item.deadline <= now and not item.future.done():
                item.future.set_exception(
                    StoreUnavailableError(f"etcd at {store._where} did not answer within {store._timeout:g} s")
                )
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        try:
            resp, resent = await store._send_fenced(fence, batch, timeout=min(i.deadline for i in batch) - now)
        except StoreError as e:
            if len(batch) > 1 and type(e) is not LeadershipLostError:  # refused whole, applied in nothing
                for item in batch:
                    await cls._flush(store, fence, [item])
                return
            cls._fail(batch, e)
            return
        except Exception as e:  # the request failed: every write in it did
            cls._fail(batch, e)
            return
        revision = int(resp.header.revision)
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result((resp.responses[i].response_txn, revision, resent))

    @staticmethod
    def _fail(batch: list[_Batched], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(_alike(error, item))


def _conflict(item: _Batched, *key_sets: set[bytes]) -> bool:
    """Whether `item` touches what others read or write (`key_sets`: reads, writes, then again for more): a key
    it writes that one of them reads or writes, or a key it reads that one of them writes. Reading one key is no
    conflict."""
    for reads, writes in zip(key_sets[::2], key_sets[1::2], strict=True):
        if not item.writes.isdisjoint(reads) or not item.writes.isdisjoint(writes) or not item.reads.isdisjoint(writes):
            return True
    return False


def _alike(error: Exception, item: _Batched) -> Exception:
    """`error`, as raised for one write of a failed request: an exception of its own (one object raised in many
    tasks would gather all their tracebacks), saying what it said, with the same cause."""
    try:
        copy = type(error)(*error.args)
    except Exception:
        return error
    copy.__cause__ = error.__cause__
    return copy


class _FencedStore(EtcdStore):
    """`EtcdStore.fenced`: shares the store's `__dict__` (its client and every piece of its state, later changes
    included); only the fence is its own."""

    __slots__ = ("_fence",)

    def __init__(self, fence: Callable[[], Fence | None]) -> None:  # no super().__init__: the state is shared
        self._fence = fence

    def _fence_now(self) -> Fence | None:
        fence = self._fence()
        if fence is None:
            raise LeadershipLostError("not written: this daemon does not lead, so it writes nothing")
        return fence


async def _one(request: Any) -> AsyncIterator[Any]:
    """A request stream of one request, closed after it (the server answers, then ends the stream)."""
    yield request
