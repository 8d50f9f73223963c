"""Writes `status/<kind>/<name>`, guarded by the desired revision the outcome is about.

The write is a transaction comparing the desired key's mod_revision with the
revision the outcome was computed for (0 when the desired key is deleted),
so a status for an outdated desired value can never overwrite one for the
current value. Unchanged statuses are not rewritten, which keeps resync and
polling from churning etcd revisions. A status written without a plan (say,
`Converged` because nothing needed doing) keeps the id of the last plan run
for that resource, so `setpoint status` always shows what was last done.

`applied` is the last desired value the resource converged to. It is what
makes a deletion durable: when a desired key is deleted while setpoint is
down (and the history is compacted away), the status still says what has to
be torn down.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from plans import Resource, ResourceKey
from reconciler.keys import KeySpace
from reconciler.store import EtcdStore

MAX_MESSAGE_CHARS = 1000  # a status must always fit in etcd, whatever a value or tool said


class Phase(StrEnum):
    PENDING = "Pending"
    PLANNING = "Planning"
    AWAITING_APPROVAL = "AwaitingApproval"
    EXECUTING = "Executing"
    CONVERGED = "Converged"
    FAILED = "Failed"
    BLOCKED = "Blocked"
    INVALID = "Invalid"


class Status(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    phase: Phase
    observed_revision: int
    plan_id: str | None = None
    message: str = ""
    updated_at: datetime
    applied: Resource | None = None


class StatusWriter:
    def __init__(self, *, store: EtcdStore, keys: KeySpace) -> None:
        self._store = store
        self._keys = keys
        self._last: dict[ResourceKey, tuple[Phase, int, str | None, str, Resource | None]] = {}
        self.changed = False

    async def write(
        self,
        key: ResourceKey,
        *,
        phase: Phase,
        desired_revision: int,
        message: str = "",
        plan_id: str | None = None,
        guard_revision: int | None = None,
        applied: Resource | None = None,
    ) -> bool:
        """Write the status if it changed; False when the desired key moved on (nothing written).

        `guard_revision` is the desired key's mod_revision to compare against
        (defaults to `desired_revision`; pass 0 for a deleted desired key).
        `plan_id` and `applied` keep their previous values when not given.
        Sets `self.changed` to whether anything was written.
        """
        self.changed = False
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        if key not in self._last:
            await self._load(key)
        previous = self._last.get(key)
        if plan_id is None and previous is not None:
            plan_id = previous[2]
        if applied is None and previous is not None:
            applied = previous[4]
        signature = (phase, desired_revision, plan_id, message, applied)
        if previous == signature:
            return True
        status = Status(
            phase=phase,
            observed_revision=desired_revision,
            plan_id=plan_id,
            message=message,
            updated_at=datetime.now(UTC),
            applied=applied,
        )
        written = await self._store.put_if_revision(
            self._keys.status(key),
            status.model_dump_json().encode(),
            guard_key=self._keys.desired(key),
            guard_mod_revision=desired_revision if guard_revision is None else guard_revision,
        )
        if written:
            self._last[key] = signature
            self.changed = True
        return written

    async def applied(self, key: ResourceKey) -> Resource | None:
        """The last desired value `key` converged to, as recorded in its status."""
        if key not in self._last:
            await self._load(key)
        previous = self._last.get(key)
        return previous[4] if previous is not None else None

    async def _load(self, key: ResourceKey) -> None:
        kv = await self._store.get(self._keys.status(key))
        if kv is None:
            return
        try:
            status = Status.model_validate_json(kv.value)
        except ValueError:
            return  # unreadable: it will simply be overwritten
        self._last[key] = (status.phase, status.observed_revision, status.plan_id, status.message, status.applied)

    async def delete(self, key: ResourceKey) -> None:
        await self._store.delete(self._keys.status(key))
        self._last.pop(key, None)


def applied_from_status(value: bytes) -> Resource | None:
    """The `applied` resource recorded in a status value, or None if there is none or it cannot be read."""
    try:
        return Status.model_validate_json(value).applied
    except ValueError:
        return None
