"""Writes plan records, and the statuses that belong with them, in as few etcd requests as it can.

A plan's record lives under `plans/<id>`. Three moments of a plan write it:

- **begin**: the record, its first step already `running`, together with
  status `Executing`, in one transaction guarded by the desired revision the
  plan was made for. A plan for a value that has moved on is refused there,
  before anything runs.
- **progress**: before each later step, the record alone: the previous
  step's result and this step's start in one write.
- **settle**: the final record, the final status and the resource's new
  observation in one transaction. Only the status depends on the guard; the
  record and the observation are written whatever happened to the desired
  value meanwhile, because they say what was done and what is.

So a plan of N steps costs N + 1 requests. A transaction larger than etcd
accepts in one request (a big file's content sits in both its plan and its
status) is split into its writes: first those made whatever happens, then
each guarded one in its own guarded transaction, status before record.
"""

from __future__ import annotations

from collections.abc import Sequence

from plans import PlanRecord
from plans.journal import utcnow
from reconciler.keys import KeySpace
from reconciler.status import StatusUpdate, StatusWriter
from reconciler.store import MAX_REQUEST_BYTES, EtcdStore, Guard, Op, Put, request_bytes


class PlanJournal:
    def __init__(self, *, store: EtcdStore, keys: KeySpace, status: StatusWriter) -> None:
        self._store = store
        self._keys = keys
        self._status = status

    def record_put(self, record: PlanRecord) -> Put:
        record.updated_at = utcnow()
        return Put(self._keys.plan(record.plan.id), record.model_dump_json().encode())

    async def read(self, plan_id: str) -> PlanRecord | None:
        """The stored record of `plan_id`, or None when there is none or it cannot be read."""
        kv = await self._store.get(self._keys.plan(plan_id))
        if kv is None:
            return None
        try:
            return PlanRecord.model_validate_json(kv.value)
        except ValueError:
            return None

    async def save(self, record: PlanRecord) -> None:
        """Write the record on its own."""
        await self._store.txn(then=[self.record_put(record)])

    async def begin(
        self,
        record: PlanRecord,
        *,
        guard: Guard | Sequence[Guard],
        status: StatusUpdate | None,
        also: Sequence[Op] = (),
    ) -> bool:
        """Write the record, its `Executing` status and `also` if every guard holds; False (nothing written) if not."""
        guarded: list[Op] = [status.put] if status is not None else []
        guarded += [self.record_put(record), *also]
        if not await self._commit(guard, guarded=guarded, always=[], status=status):
            return False
        if status is not None:
            self._status.remember(status)
        return True

    async def settle(
        self,
        record: PlanRecord | None,
        *,
        guard: Guard,
        status: StatusUpdate | None = None,
        guarded: Sequence[Op] = (),
        observed: Put | None = None,
        also: Sequence[Op] = (),
    ) -> bool:
        """Write the final record, `observed` and `also` in any case, and `status` and `guarded` if `guard` holds.

        True when the guarded writes were made. `record` is None when no plan ran (a removal).
        """
        always: list[Op] = [self.record_put(record)] if record is not None else []
        if observed is not None:
            always.append(observed)
        always.extend(also)
        conditional: list[Op] = [status.put] if status is not None else []
        conditional.extend(guarded)
        held = await self._commit(guard, guarded=conditional, always=always, status=status)
        if held and status is not None:
            self._status.remember(status)
        return held

    async def _commit(
        self, guard: Guard | Sequence[Guard], *, guarded: list[Op], always: list[Op], status: StatusUpdate | None
    ) -> bool:
        try:
            return await self._write(guard, guarded=guarded, always=always)
        except BaseException:
            if status is not None:
                self._status.unknown(status.key)  # etcd may have applied it all the same
            raise

    async def _write(self, guard: Guard | Sequence[Guard], *, guarded: list[Op], always: list[Op]) -> bool:
        if request_bytes([*always, *guarded]) <= MAX_REQUEST_BYTES:
            return await self._store.txn(guard=guard, then=[*always, *guarded], otherwise=always)
        for op in always:
            await self._store.txn(then=[op])
        if not guarded:
            return await self._store.txn(guard=guard)
        for op in guarded:
            if not await self._store.txn(guard=guard, then=[op]):
                return False
        return True
