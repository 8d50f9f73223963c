"""The etcd adapter: the only module that imports the etcd client.

It speaks in plain data (`KeyValue`, `WatchBatch`) and a small error
vocabulary so the rest of the reconciler never sees gRPC. Unary calls go
through etcd3aio's services (which retry UNAVAILABLE / DEADLINE_EXCEEDED a
few times). The watch is driven on the raw Watch stub instead of etcd3aio's
`watch()`, because that helper silently resumes at `compact_revision + 1`
after a compaction, which loses updates; here a compaction ends the stream
with `WatchCompactedError` and the caller relists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import grpc
import grpc.aio
from etcd3aio import Etcd3Client, EtcdConnectionError, EtcdError, EtcdTransientError, prefix_range_end
from etcd3aio._protobuf import Compare, WatchCreateRequest, WatchRequest, WatchStub

from plans import TemporaryError

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_REQUEST_BYTES = 1_500_000  # etcd's default --max-request-bytes (1.5 MiB)
_PAGE = 500
# A page or watch response may carry many values of up to 1.5 MiB each; gRPC's
# default 4 MiB receive limit would turn a large but valid key space into an error.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024


class StoreError(Exception):
    """etcd refused or failed a request for a reason retrying will not fix."""


class StoreUnavailableError(TemporaryError):
    """etcd could not be reached or did not answer in time."""


class WatchCompactedError(Exception):
    """The watch start revision has been compacted away; relist at a fresh revision."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: its events (possibly none, for progress notifications) and header revision."""

    events: tuple[WatchEvent, ...]
    revision: int


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=bytes(pb.key),
        value=bytes(pb.value),
        mod_revision=pb.mod_revision,
        create_revision=pb.create_revision,
        version=pb.version,
    )


def range_end(prefix: bytes) -> bytes:
    return bytes(prefix_range_end(prefix))


class EtcdStore:
    """An async etcd client bound to endpoints; use as `async with EtcdStore(...)`."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 10.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self._timeout = timeout
        self._client = Etcd3Client(self.endpoints, rpc_max_attempts=3)
        # etcd3aio builds its channel from these options and offers no parameter for the limit.
        self._client._manager.grpc_options.append(("grpc.max_receive_message_length", MAX_RECEIVE_BYTES))
        self._connected = False

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        await self._client.connect()
        self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._client.close()

    @property
    def _kvs(self) -> Any:
        if self._client.kv is None:
            raise StoreError("etcd client is not connected")
        return self._client.kv

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (EtcdConnectionError, EtcdTransientError, TimeoutError) as e:
            raise StoreUnavailableError(f"etcd at {','.join(self.endpoints)} is unavailable: {e}") from e
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StoreUnavailableError(f"etcd is unavailable: {e.code().name}") from e
            raise StoreError(f"etcd refused the request: {e.code().name}: {e.details()}") from e
        except EtcdError as e:
            raise StoreError(str(e)) from e

    async def ping(self) -> int:
        """The cluster's current revision; raises StoreUnavailableError when etcd does not answer."""
        resp = await self._call(self._kvs.get(b"\x00", count_only=True, timeout=self._timeout))
        return int(resp.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(self._kvs.get(key.encode(), timeout=self._timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, start: bytes, end: bytes, *, revision: int = 0) -> tuple[list[KeyValue], int]:
        """Every key in [start, end) at one revision (the current one when 0), read in pages."""
        items: list[KeyValue] = []
        key = start
        while True:
            resp = await self._call(
                self._kvs.get(key, end, revision=revision, limit=_PAGE, timeout=self._timeout)
            )
            if revision == 0:
                revision = int(resp.header.revision)
            items.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return items, revision
            key = bytes(resp.kvs[-1].key) + b"\x00"

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        start = prefix.encode()
        return await self.range(start, range_end(start))

    async def put(self, key: str, value: bytes) -> int:
        resp = await self._call(self._kvs.put(key.encode(), value, timeout=self._timeout))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        resp = await self._call(self._kvs.delete(key.encode(), timeout=self._timeout))
        return int(resp.deleted) > 0

    async def put_all(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Write every item in one transaction (so all or none land); at most MAX_TXN_OPS items."""
        if len(items) > MAX_TXN_OPS:
            raise StoreError(f"{len(items)} writes exceed etcd's {MAX_TXN_OPS} operations per transaction")
        ops = [self._kvs.txn_op_put(k.encode(), v) for k, v in items]
        resp = await self._call(self._kvs.txn([], ops, timeout=self._timeout))
        return int(resp.header.revision)

    async def put_if_revision(
        self, key: str, value: bytes, *, guard_key: str, guard_mod_revision: int
    ) -> bool:
        """Put `key` only if `guard_key`'s mod_revision is `guard_mod_revision` (0: the guard key is absent)."""
        compare = Compare(
            result=Compare.EQUAL, target=Compare.MOD, key=guard_key.encode(), mod_revision=guard_mod_revision
        )
        resp = await self._call(
            self._kvs.txn([compare], [self._kvs.txn_op_put(key.encode(), value)], timeout=self._timeout)
        )
        return bool(resp.succeeded)

    async def compact(self, revision: int) -> None:
        await self._call(self._kvs.compact(revision, physical=True, timeout=self._timeout))

    async def watch(self, start: bytes, end: bytes, *, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Stream changes to [start, end) from `start_revision`, with prev_kv and progress notifications.

        Ends with WatchCompactedError when `start_revision` was compacted,
        StoreUnavailableError on transport failure; never resumes by itself.
        """
        if self._client.watch is None:
            raise StoreError("etcd client is not connected")
        channel = self._client._channel  # the channel etcd3aio built, shared with the unary services
        stub = WatchStub(channel)

        async def requests() -> AsyncIterator[Any]:
            yield WatchRequest(
                create_request=WatchCreateRequest(
                    key=start, range_end=end, start_revision=start_revision, prev_kv=True, progress_notify=True
                )
            )
            await asyncio.Event().wait()  # keep the stream open until cancelled

        call = stub.Watch(requests())
        try:
            async for resp in call:
                if resp.compact_revision > 0:
                    raise WatchCompactedError(int(resp.compact_revision))
                if resp.canceled:
                    raise StoreUnavailableError(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason'}")
                if resp.created and not resp.events:
                    continue
                events = tuple(
                    WatchEvent(
                        type="delete" if ev.type == 1 else "put",
                        kv=_kv(ev.kv),
                        prev=_kv(ev.prev_kv) if ev.HasField("prev_kv") else None,
                    )
                    for ev in resp.events
                )
                yield WatchBatch(events=events, revision=int(resp.header.revision))
            raise StoreUnavailableError("etcd closed the watch stream")
        except grpc.aio.AioRpcError as e:
            raise StoreUnavailableError(f"watch stream failed: {e.code().name}") from e
        finally:
            call.cancel()
