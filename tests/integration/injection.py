"""Fault injection at our etcd wrapper: chosen writes fail as if etcd had not answered.

`fail_writes(monkeypatch, predicate, times=n)` makes the next `n` write
requests that carry a (key, value) matching `predicate` raise instead of
reaching etcd. Every write method of `EtcdStore` is covered, so a test keeps
working when the code under test batches writes differently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

from reconciler.store import EtcdStore, StoreUnavailableError

Predicate = Callable[[str, bytes], bool]


class WriteFaults:
    def __init__(self, predicate: Predicate, *, times: int, error: Callable[[str], Exception]) -> None:
        self.predicate = predicate
        self.left = times
        self.error = error
        self.failed: list[str] = []  # keys of the writes that were refused

    def check(self, items: Iterable[tuple[str, bytes]]) -> None:
        if self.left <= 0:
            return
        for key, value in items:
            if self.predicate(key, value):
                self.left -= 1
                self.failed.append(key)
                raise self.error(f"injected: etcd did not answer the write of {key}")


def _ops(ops: Iterable[Any]) -> list[tuple[str, bytes]]:
    return [(op.key, op.value) for op in ops if hasattr(op, "value")]


def fail_writes(
    monkeypatch: pytest.MonkeyPatch,
    predicate: Predicate,
    *,
    times: int = 1,
    error: Callable[[str], Exception] = StoreUnavailableError,
) -> WriteFaults:
    faults = WriteFaults(predicate, times=times, error=error)
    put = EtcdStore.put

    async def failing_put(self: EtcdStore, key: str, value: bytes) -> int:
        faults.check([(key, value)])
        return await put(self, key, value)

    monkeypatch.setattr(EtcdStore, "put", failing_put)
    if hasattr(EtcdStore, "put_if_revision"):
        put_if_revision = EtcdStore.put_if_revision

        async def failing_put_if_revision(self: EtcdStore, key: str, value: bytes, **kwargs: Any) -> bool:
            faults.check([(key, value)])
            return bool(await put_if_revision(self, key, value, **kwargs))

        monkeypatch.setattr(EtcdStore, "put_if_revision", failing_put_if_revision)
    if hasattr(EtcdStore, "txn"):
        txn = EtcdStore.txn

        async def failing_txn(self: EtcdStore, **kwargs: Any) -> Any:
            faults.check(_ops([*kwargs.get("then", ()), *kwargs.get("otherwise", ())]))
            return await txn(self, **kwargs)

        monkeypatch.setattr(EtcdStore, "txn", failing_txn)
    return faults


def is_plan_record(prefix: str, check: Callable[[dict[str, Any]], bool]) -> Predicate:
    """A predicate for writes of plan records under `prefix` whose JSON passes `check`."""
    import json

    def predicate(key: str, value: bytes) -> bool:
        return key.startswith(f"{prefix}/plans/") and check(json.loads(value))

    return predicate
