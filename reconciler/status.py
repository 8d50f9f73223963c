"""Writes `status/<kind>/<name>`, guarded by the desired revision the outcome is about.

Every status write is part of a transaction that compares the desired key's
mod_revision with the revision the outcome was computed for (0 when the
desired key is deleted), so a status for an outdated desired value can never
overwrite one for the current value. Unchanged statuses are not rewritten,
which keeps resync and polling from churning etcd revisions. A status written
without a plan (say, `Converged` because nothing needed doing) keeps the id of
the last plan run for that resource, so `setpoint status` always shows what
was last done.

A status is either written on its own (`write`) or prepared (`prepare`) and
committed inside a plan's transaction by the journal, which then calls
`remember`. Every write says what happened (`WriteResult`): there is no flag
to read afterwards, which another worker could have changed in between.

The writer remembers the last status of every key. At start-up it is seeded
from the full list of statuses (`seed`), so it needs no read before a key's
first write; a key it has never heard of is read once. A write that failed
may still have been applied (etcd committed it, the answer was lost), so
after any failure the key is read again before it is trusted (`unknown`).

`applied` is the last desired value the resource converged to. It is what
makes a deletion durable: when a desired key is deleted while setpoint is
down (and the history is compacted away), the status still says what has to
be torn down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from plans import IssueRef, Resource, ResourceKey
from reconciler.issues import IssueMark, IssueState, IssueStatus, merge, newly
from reconciler.keys import KeySpace
from reconciler.store import Delete, EtcdStore, Guard, KeyValue, Put

if TYPE_CHECKING:  # the cache imports this module
    from reconciler.cache import IssueEntry

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


# What a status write about a plan says of the issues that plan answers.
_ISSUE_STATE = {
    Phase.PENDING: IssueState.HEALING,  # interrupted by shutdown: resumed at the next start
    Phase.PLANNING: IssueState.HEALING,
    Phase.EXECUTING: IssueState.HEALING,
    Phase.AWAITING_APPROVAL: IssueState.AWAITING_APPROVAL,
    Phase.CONVERGED: IssueState.HEALED,
    Phase.FAILED: IssueState.FAILED,
    Phase.BLOCKED: IssueState.BLOCKED,
    Phase.INVALID: IssueState.FAILED,
}


class WriteResult(StrEnum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"  # the stored status already said this: nothing was written
    STALE = "stale"  # the desired value moved on: nothing was written


class Status(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    phase: Phase
    observed_revision: int
    plan_id: str | None = None
    message: str = ""
    updated_at: datetime
    applied: Resource | None = None
    baseline: dict[str, JsonValue] | None = Field(
        default=None, description="What the resource looked like when it converged to `applied`."
    )
    recent_plans: list[datetime] = Field(
        default_factory=list, description="When the last plans for this resource began (the flap guard's memory)."
    )
    last_error: str | None = Field(
        default=None, description="What the last plan failed with, until the resource converges again."
    )
    deleted: bool = Field(
        default=False, description="Written for the deletion of the desired value (at `observed_revision`)."
    )
    issues: list[IssueStatus] = Field(
        default_factory=list, description="The open issues, oldest first, with what was done about each."
    )

    def says_what(self, other: Status | None) -> bool:
        """Whether `other` says the same as this, whenever it was written."""
        if other is None or other.phase is not self.phase or other.observed_revision != self.observed_revision:
            return False  # the common answer, at a fraction of the cost of a copy and a comparison of every field
        return self.model_copy(update={"updated_at": other.updated_at}) == other


# A stored status that cannot be read: it says nothing, so the next write replaces it.
_UNREADABLE = Status(phase=Phase.PENDING, observed_revision=-1, updated_at=datetime.fromtimestamp(0, UTC))


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A status write, ready to go into a transaction."""

    key: ResourceKey
    put: Put
    status: Status


def guard_for(keys: KeySpace, key: ResourceKey, *, revision: int, deleted: bool) -> Guard:
    """The condition under which an outcome for `key` at `revision` is still current."""
    return Guard(keys.desired(key), 0 if deleted else revision)


def parse_status(value: bytes) -> Status | None:
    try:
        return Status.model_validate_json(value)
    except ValueError:
        return None


class StatusWriter:
    def __init__(
        self,
        *,
        store: EtcdStore,
        keys: KeySpace,
        open_issues: Callable[[ResourceKey], Sequence[IssueEntry]] = lambda key: (),
        on_heal: Callable[[IssueState], None] = lambda state: None,
    ) -> None:
        """`open_issues` gives the issues open on a resource (the cache's); `on_heal` hears each issue
        report's final state, or `blocked`, once written."""
        self._store = store
        self._keys = keys
        self._open_issues = open_issues
        self._on_heal = on_heal
        self._last: dict[ResourceKey, Status | None] = {}
        self._seeded = False
        self._unknown: set[ResourceKey] = set()

    def seed(self, statuses: Iterable[KeyValue]) -> None:
        """Remember the statuses listed at start-up; keys not among them have none."""
        for kv in statuses:
            parsed = self._keys.parse(kv.key)
            if parsed is not None and parsed.resource is not None:
                self._last[parsed.resource] = parse_status(kv.value) or _UNREADABLE
        self._seeded = True

    async def prepare(
        self,
        key: ResourceKey,
        *,
        phase: Phase,
        revision: int,
        message: str = "",
        plan_id: str | None = None,
        applied: Resource | None = None,
        baseline: dict[str, JsonValue] | None = None,
        recent_plans: list[datetime] | None = None,
        last_error: str | None = None,
        deleted: bool = False,
        answers: Collection[IssueRef] = (),
        marks: Sequence[IssueMark] = (),
    ) -> StatusUpdate | None:
        """The write that records this status, or None when the stored status already says it.

        `revision` is the desired revision the status describes. `plan_id`,
        `applied`, `baseline`, `recent_plans` and `last_error` keep their values
        when not given, except that a new `applied` given without a baseline has
        none, and `Converged` clears `last_error`. The open issues are listed
        afresh (`issues.merge`): `answers` are the reports of those the plan
        `plan_id` answers, `marks` what was found about others.
        """
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        kept = await self._previous(key) or _UNREADABLE  # what is not given stays as it was
        if applied is not None and applied != kept.applied and baseline is None:
            kept = kept.model_copy(update={"baseline": None})  # the old value's look says nothing of the new one
        status = Status(
            phase=phase,
            observed_revision=revision,
            plan_id=plan_id if plan_id is not None else kept.plan_id,
            message=message,
            updated_at=datetime.now(UTC),
            applied=applied if applied is not None else kept.applied,
            baseline=baseline if baseline is not None else kept.baseline,
            recent_plans=recent_plans if recent_plans is not None else kept.recent_plans,
            last_error=last_error if last_error is not None or phase is Phase.CONVERGED else kept.last_error,
            deleted=deleted,
            issues=merge(
                kept.issues, self._open_issues(key) if not deleted else (), now=datetime.now(UTC), plan_id=plan_id,
                plan_state=_ISSUE_STATE[phase] if plan_id is not None else None, answers=answers, message=message,
                marks=marks,
            ),
        )
        previous = self._last.get(key)
        if status.says_what(previous):
            return None
        return StatusUpdate(key, Put(self._keys.status(key), status.model_dump_json().encode()), status)

    def remember(self, update: StatusUpdate) -> None:
        """`update` was committed."""
        previous = self._last.get(update.key)
        for state in newly(previous.issues if previous is not None else [], update.status.issues):
            self._on_heal(state)
        self._last[update.key] = update.status
        self._unknown.discard(update.key)

    def unknown(self, key: ResourceKey) -> None:
        """A write of `key`'s status failed and may or may not have been applied: read it before trusting it."""
        self._last.pop(key, None)
        self._unknown.add(key)

    async def write(
        self,
        key: ResourceKey,
        *,
        phase: Phase,
        revision: int,
        deleted: bool = False,
        message: str = "",
        plan_id: str | None = None,
        applied: Resource | None = None,
        baseline: dict[str, JsonValue] | None = None,
        marks: Sequence[IssueMark] = (),
    ) -> WriteResult:
        """Write the status on its own, if it changed and the desired value is still at `revision`."""
        update = await self.prepare(
            key, phase=phase, revision=revision, message=message, plan_id=plan_id, applied=applied, baseline=baseline,
            deleted=deleted, marks=marks,
        )  # fmt: skip
        return await self._commit(update, revision=revision, deleted=deleted)

    async def mark_issues(self, key: ResourceKey, marks: Sequence[IssueMark] = ()) -> WriteResult:
        """Bring the stored status's issue list up to date (new ones `open`, resolved ones gone), with `marks`,
        saying the rest as it does. Nothing is written when there is no status yet: the first one lists them."""
        kept = await self._previous(key)
        if kept is None or kept is _UNREADABLE:
            return WriteResult.UNCHANGED
        if not kept.issues and not marks and not self._open_issues(key):
            return WriteResult.UNCHANGED  # the common case, at every reconcile: no issues before or now
        update = await self.prepare(
            key, phase=kept.phase, revision=kept.observed_revision, message=kept.message, deleted=kept.deleted,
            marks=marks,
        )  # fmt: skip
        return await self._commit(update, revision=kept.observed_revision, deleted=kept.deleted)

    async def plan_id(self, key: ResourceKey) -> str | None:
        """The plan the stored status names: the last one run for `key`, or the one waiting or held."""
        previous = await self._previous(key)
        return previous.plan_id if previous is not None else None

    async def issue_statuses(self, key: ResourceKey) -> list[IssueStatus]:
        """What the stored status says of `key`'s open issues."""
        previous = await self._previous(key)
        return list(previous.issues) if previous is not None else []

    async def _commit(self, update: StatusUpdate | None, *, revision: int, deleted: bool) -> WriteResult:
        if update is None:
            return WriteResult.UNCHANGED
        key = update.key
        guard = guard_for(self._keys, key, revision=revision, deleted=deleted)
        try:
            written = await self._store.txn(guard=guard, then=[update.put])
        except BaseException:
            self.unknown(key)
            raise
        if not written:
            return WriteResult.STALE
        self.remember(update)
        return WriteResult.WRITTEN

    def keys(self) -> list[ResourceKey]:
        """The resources this writer knows a status of (after `seed`, every stored one)."""
        return [key for key, status in self._last.items() if status is not None]

    def phase_counts(self) -> dict[tuple[str, str], int]:
        """How many resources of each kind are in each phase, by (kind, phase), from the statuses this writer
        knows (at start-up, every stored one). Every phase of a kind with a status is counted, 0 included, so a
        phase that empties reads 0 rather than vanishing."""
        found = Counter((key.kind, status.phase.value) for key, status in self._last.items() if status is not None)
        kinds = {kind for kind, _ in found}
        return {(kind, phase.value): found[(kind, phase.value)] for kind in kinds for phase in Phase}

    async def is_converged(self, key: ResourceKey, revision: int) -> bool:
        """Whether the stored status says `key` converged at desired `revision` (and to what it looked like)."""
        previous = await self._previous(key)
        return (
            previous is not None
            and previous.phase is Phase.CONVERGED
            and previous.observed_revision == revision
            and previous.baseline is not None
        )

    async def converged_as(self, key: ResourceKey, revision: int) -> dict[str, JsonValue] | None:
        """What `key` looked like when it converged at desired `revision`, when its stored status says it did."""
        previous = await self._previous(key)
        if previous is None or previous.phase is not Phase.CONVERGED or previous.observed_revision != revision:
            return None
        return previous.baseline

    async def applied(self, key: ResourceKey) -> Resource | None:
        """The last desired value `key` converged to, as recorded in its status."""
        previous = await self._previous(key)
        return previous.applied if previous is not None else None

    def delete_op(self, key: ResourceKey) -> Delete:
        return Delete(self._keys.status(key))

    def forget(self, key: ResourceKey) -> None:
        """`key`'s status was deleted."""
        self._last[key] = None
        self._unknown.discard(key)

    async def delete(self, key: ResourceKey) -> WriteResult:
        """Delete `key`'s status, if its desired key is still absent."""
        if await self._previous(key) is None:
            return WriteResult.UNCHANGED  # there is none: no request
        guard = guard_for(self._keys, key, revision=0, deleted=True)
        try:
            deleted = await self._store.txn(guard=guard, then=[self.delete_op(key)])
        except BaseException:
            self.unknown(key)
            raise
        if not deleted:
            return WriteResult.STALE
        self.forget(key)
        return WriteResult.WRITTEN

    async def _previous(self, key: ResourceKey) -> Status | None:
        if key not in self._last:
            if self._seeded and key not in self._unknown:
                return None  # not in the start-up list and never written since: there is none
            kv = await self._store.get(self._keys.status(key))
            self._last[key] = (parse_status(kv.value) or _UNREADABLE) if kv is not None else None
            self._unknown.discard(key)
        return self._last[key]


def applied_from_status(value: bytes) -> tuple[Resource | None, int | None]:
    """The `applied` resource recorded in a status value (None if there is none or it cannot be read), and the
    revision of the deletion the status was written for (None when it was not written for one)."""
    status = parse_status(value)
    if status is None:
        return None, None
    return status.applied, status.observed_revision if status.deleted else None
