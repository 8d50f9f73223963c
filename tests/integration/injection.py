"""Fault injection at our etcd wrapper: chosen writes fail as if etcd had not answered.

`fail_writes(monkeypatch, predicate, times=n)` makes the next `n` write
requests that carry a (key, value) matching `predicate` raise instead of
reaching etcd; with `applied=True` the request reaches etcd and takes effect,
and only its answer is lost (a timeout after the commit). Every write method
of `EtcdStore` is covered, so a test keeps working when the code under test
batches writes differently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

from reconciler.store import EtcdStore, StoreUnavailableError

Predicate = Callable[[str, bytes], bool]


class WriteFaults:
    def __init__(
        self, predicate: Predicate, *, times: int, error: Callable[[str], Exception], applied: bool
    ) -> None:
        self.predicate = predicate
        self.left = times
        self.error = error
        self.applied = applied
        self.failed: list[str] = []  # keys of the writes that were refused

    def hit(self, items: Iterable[tuple[str, bytes]]) -> str | None:
        """The key of the write this request fails on, or None to let it through."""
        if self.left <= 0:
            return None
        for key, value in items:
            if self.predicate(key, value):
                self.left -= 1
                self.failed.append(key)
                return key
        return None

    async def call(self, items: Iterable[tuple[str, bytes]], write: Any) -> Any:
        key = self.hit(items)
        if key is None:
            return await write()
        if self.applied:
            await write()
        raise self.error(f"injected: etcd did not answer the write of {key}")


def _ops(ops: Iterable[Any]) -> list[tuple[str, bytes]]:
    """The keys a transaction writes, with their values (empty for a delete)."""
    return [(op.key, getattr(op, "value", b"")) for op in ops]


def fail_writes(
    monkeypatch: pytest.MonkeyPatch,
    predicate: Predicate,
    *,
    times: int = 1,
    error: Callable[[str], Exception] = StoreUnavailableError,
    applied: bool = False,
) -> WriteFaults:
    faults = WriteFaults(predicate, times=times, error=error, applied=applied)
    put, txn = EtcdStore.put, EtcdStore.txn

    async def failing_put(self: EtcdStore, key: str, value: bytes) -> int:
        return int(await faults.call([(key, value)], lambda: put(self, key, value)))

    async def failing_txn(self: EtcdStore, **kwargs: Any) -> Any:
        items = _ops([*kwargs.get("then", ()), *kwargs.get("otherwise", ())])
        return await faults.call(items, lambda: txn(self, **kwargs))

    monkeypatch.setattr(EtcdStore, "put", failing_put)
    monkeypatch.setattr(EtcdStore, "txn", failing_txn)
    return faults


def is_plan_record(prefix: str, check: Callable[[dict[str, Any]], bool]) -> Predicate:
    """A predicate for writes of plan records under `prefix` whose JSON passes `check`."""
    import json

    def predicate(key: str, value: bytes) -> bool:
        return key.startswith(f"{prefix}/plans/") and bool(value) and check(json.loads(value))

    return predicate
