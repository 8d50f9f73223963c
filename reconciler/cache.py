"""The in-memory cache of desired and actual state, fed only by the reflector.

Values are parsed once, on arrival, and a value that cannot be parsed is
kept as an entry with an `error` instead of a resource: the worker turns it
into phase `Invalid` and nothing else is affected. Parsing never raises.

A deleted desired resource leaves a tombstone holding its last valid value,
because that value is the only record of what must be torn down. Events
older than what the cache already holds for a key are dropped, so a replayed
or reordered event can never move a key backwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from pydantic import ValidationError

from plans import Approval, Issue, Observed, Resource, ResourceKey
from plans.errors import describe_validation_error
from reconciler.keys import KeySpace, ParsedKey, Section
from reconciler.status import applied_from_status
from reconciler.store import KeyValue

MAX_ERROR_CHARS = 300
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape in U+D800..U+DFFF
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class DesiredEntry:
    key: ResourceKey
    mod_revision: int
    resource: Resource | None
    error: str | None = None
    deleted: bool = False

    @property
    def valid(self) -> bool:
        return self.resource is not None and self.error is None


@dataclass(frozen=True, slots=True)
class ApprovalEntry:
    plan_id: str
    mod_revision: int
    approval: Approval | None
    error: str | None = None


def parse_approval(plan_id: str, kv: KeyValue) -> ApprovalEntry:
    """The decision under `approvals/<plan_id>`, or why it cannot be read (never raises)."""
    try:
        return ApprovalEntry(plan_id, kv.mod_revision, Approval.model_validate_json(kv.value))
    except ValidationError as e:
        return ApprovalEntry(plan_id, kv.mod_revision, None, _truncate(describe_validation_error(e)))
    except Exception as e:
        return ApprovalEntry(plan_id, kv.mod_revision, None, _truncate(f"{type(e).__name__}: {e}"))


@dataclass(frozen=True, slots=True)
class ActualEntry:
    key: ResourceKey
    mod_revision: int
    observed: Observed | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IssueEntry:
    """An open issue on `key`. `report` names this report: it changes when the value does, or when the issue
    is removed and reported again, and an issue is healed once per report."""

    key: ResourceKey
    id: str
    mod_revision: int
    create_revision: int
    issue: Issue
    report: str


def parse_issue(key: ResourceKey, issue_id: str, kv: KeyValue) -> tuple[IssueEntry | None, str | None]:
    """The issue under `issues/<key>/<issue_id>`, or why it cannot be read (never raises)."""
    try:
        data, error = _decode(kv.value)
        if error is not None:
            return None, _truncate(error)
        if not isinstance(data, dict):
            return None, "value must be a JSON object (the issue)"
        issue = Issue.model_validate(data)
    except ValidationError as e:
        return None, _truncate(f"invalid issue value: {describe_validation_error(e)}")
    except Exception as e:  # etcd's data must never stop the watch
        return None, _truncate(f"setpoint could not read this issue value ({type(e).__name__}: {e})")
    report = f"{kv.create_revision}-{hashlib.sha256(kv.value).hexdigest()[:12]}"
    return IssueEntry(key, issue_id, kv.mod_revision, kv.create_revision, issue, report), None


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _decode(value: bytes) -> tuple[object | None, str | None]:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"value is not valid UTF-8 (byte {e.start})"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"value is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        return None, "value is not valid JSON: nested too deeply"
    except ValueError as e:  # e.g. an integer too long to convert
        return None, _truncate(f"value is not valid JSON: {e}")
    if _SURROGATE_ESCAPE.search(text) is None:
        return data, None
    try:
        # JSON may spell lone UTF-16 surrogates ("\ud800") that no UTF-8 encoder
        # accepts; they would fail later, when the value is hashed or written back.
        # Only values holding such an escape pay for this second pass.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None, "value is not valid JSON text: it contains a lone UTF-16 surrogate escape"
    except RecursionError:
        return None, "value is not valid JSON: nested too deeply"
    return data, None


M = TypeVar("M", Resource, Observed)


def _parse(model: type[M], key: ResourceKey, value: bytes, *, what: str) -> tuple[M | None, str | None]:
    """`value` as a `model` stored under `key`, or the reason it is not one (never raises)."""
    if _SURROGATE_ESCAPE_BYTES.search(value) is None:
        # The common case in one pass of pydantic's own JSON parser (2.7 us against 7.5 us for json.loads and a
        # validation of the dict). Whatever it refuses goes the long way below, which says why in our words; it
        # accepts nothing the long way refuses but integers past Python's 4,300 digits, which it refuses too.
        try:
            parsed = model.model_validate_json(value)
        except Exception:  # whatever it is, the long way gives the reason
            pass
        else:
            if parsed.kind == key.kind and parsed.name == key.name:
                return parsed, None
    data, error = _decode(value)
    if error is not None:
        return None, _truncate(error)
    if not isinstance(data, dict):
        return None, f"value must be a JSON object (the {what} {model.__name__.lower()})"
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        return None, _truncate(f"invalid {what} value: {describe_validation_error(e)}")
    except RecursionError:
        return None, f"invalid {what} value: nested too deeply"
    if parsed.kind != key.kind or parsed.name != key.name:
        return None, f"value names {parsed.key} but is stored under {key}"
    return parsed, None


def _parse_guarded(model: type[M], key: ResourceKey, value: bytes, *, what: str) -> tuple[M | None, str | None]:
    # The boundary where etcd's data enters: a value that trips a bug in parsing
    # must become that key's Invalid reason, never an exception that stops the watch
    # (which would then retry the same event forever).
    try:
        return _parse(model, key, value, what=what)
    except Exception as e:
        return None, _truncate(f"setpoint could not read this {what} value ({type(e).__name__}: {e})")


def parse_desired(key: ResourceKey, kv: KeyValue) -> DesiredEntry:
    resource, error = _parse_guarded(Resource, key, kv.value, what="desired")
    return DesiredEntry(key=key, mod_revision=kv.mod_revision, resource=resource, error=error)


def parse_actual(key: ResourceKey, kv: KeyValue) -> ActualEntry:
    observed, error = _parse_guarded(Observed, key, kv.value, what="actual")
    return ActualEntry(key=key, mod_revision=kv.mod_revision, observed=observed, error=error)


@dataclass(frozen=True, slots=True)
class Change:
    """What one applied event did: the resource it concerns, or a key that could not be mapped to one."""

    resource: ResourceKey | None
    rejected_key: str | None = None
    reason: str | None = None
    plan_id: str | None = None  # a decision on this plan arrived or went
    invalid_issue: bool = False  # with `resource`, `rejected_key` and `reason`: an issue value was ignored


class Cache:
    def __init__(self, keys: KeySpace) -> None:
        self._keys = keys
        self.desired: dict[ResourceKey, DesiredEntry] = {}
        self.actual: dict[ResourceKey, ActualEntry] = {}
        self.approvals: dict[str, ApprovalEntry] = {}  # by plan id
        self.issues: dict[ResourceKey, dict[str, IssueEntry]] = {}  # open issues, by resource and id
        self._issue_revisions: dict[tuple[ResourceKey, str], int] = {}  # last put, also of ignored values
        self._echoes: dict[ResourceKey, tuple[bytes, Observed]] = {}  # see `expect_echo`
        self.revision = 0

    def resource_keys(self) -> Iterator[ResourceKey]:
        yield from list(self.desired)

    def open_issues(self, key: ResourceKey) -> list[IssueEntry]:
        """The issues open on `key`, oldest report first."""
        return sorted(self.issues.get(key, {}).values(), key=lambda e: (e.mod_revision, e.id))

    def issue_counts(self) -> dict[tuple[str, str], int]:
        """Open issues by kind and severity."""
        counts: dict[tuple[str, str], int] = {}
        for key, entries in self.issues.items():
            for entry in entries.values():
                label = (key.kind, entry.issue.severity)
                counts[label] = counts.get(label, 0) + 1
        return counts

    def _put_issue(self, key: ResourceKey, issue_id: str, kv: KeyValue) -> Change | None:
        known = self._issue_revisions.get((key, issue_id))
        if known is not None and known >= kv.mod_revision:
            return None
        self._issue_revisions[(key, issue_id)] = kv.mod_revision
        entry, error = parse_issue(key, issue_id, kv)
        entries = self.issues.setdefault(key, {})
        if entry is not None:
            entries[issue_id] = entry
            return Change(resource=key)
        # An unreadable value is ignored; the report it replaced, if any, is withdrawn.
        entries.pop(issue_id, None)
        if not entries:
            del self.issues[key]
        return Change(resource=key, rejected_key=kv.key.decode("utf-8", "replace")[:200], reason=error,
                      invalid_issue=True)  # fmt: skip

    def _delete_issue(self, key: ResourceKey, issue_id: str, revision: int) -> Change | None:
        known = self._issue_revisions.get((key, issue_id))
        if known is None or known >= revision:
            return None
        del self._issue_revisions[(key, issue_id)]
        entries = self.issues.get(key, {})
        if entries.pop(issue_id, None) is None:
            return None  # it was an ignored value: nothing was open
        if not entries:
            del self.issues[key]
        return Change(resource=key)

    def _canonical(self, key: ResourceKey) -> ResourceKey:
        """The key object the cache already holds for `key`, else `key`: one object per resource, shared by the
        cache, the claims, the queue and whoever keeps it from a change (a key costs 200 bytes)."""
        entry = self.desired.get(key)
        if entry is not None:
            return entry.key
        actual = self.actual.get(key)
        return actual.key if actual is not None else key

    def apply_put(self, kv: KeyValue) -> Change | None:
        parsed = self._keys.parse(kv.key)
        if parsed is None:
            return None
        if parsed.plan_id:
            current_approval = self.approvals.get(parsed.plan_id)
            if current_approval is not None and current_approval.mod_revision >= kv.mod_revision:
                return None
            self.approvals[parsed.plan_id] = parse_approval(parsed.plan_id, kv)
            return Change(resource=None, plan_id=parsed.plan_id)
        if parsed.resource is None:
            return self._rejected(kv.key, parsed)
        key = self._canonical(parsed.resource)
        if parsed.issue_id:
            return self._put_issue(key, parsed.issue_id, kv)
        if parsed.section is Section.DESIRED:
            current = self.desired.get(key)
            if current is not None and current.mod_revision >= kv.mod_revision:
                return None
            self.desired[key] = parse_desired(key, kv)
        elif parsed.section is Section.ACTUAL:
            current_actual = self.actual.get(key)
            if current_actual is not None and current_actual.mod_revision >= kv.mod_revision:
                return None
            echo = self._echoes.get(key)
            if echo is not None and echo[0] == kv.value:
                del self._echoes[key]
                self.actual[key] = ActualEntry(key=key, mod_revision=kv.mod_revision, observed=echo[1])
                return None
            self.actual[key] = parse_actual(key, kv)
        else:
            return None
        return Change(resource=key)

    def expect_echo(self, observed: Observed, value: bytes) -> None:
        """A reconcile is writing `observed` (as `value`) to actual/, having acted on that very state: when the
        watch brings the write back, the cache takes it in as no change, so it queues no second reconcile of the
        key. Only the same bytes match (a stale expectation, left by a write that never landed, cannot match a
        later observation, which carries its own `observed_at`); the next expectation for the key replaces it."""
        self._echoes[observed.key] = (value, observed)

    def apply_delete(self, key_bytes: bytes, revision: int) -> Change | None:
        parsed = self._keys.parse(key_bytes)
        if parsed is not None and parsed.plan_id:
            current_approval = self.approvals.get(parsed.plan_id)
            if current_approval is None or current_approval.mod_revision >= revision:
                return None
            del self.approvals[parsed.plan_id]
            return Change(resource=None, plan_id=parsed.plan_id)
        if parsed is None or parsed.resource is None:
            return None
        key = parsed.resource
        if parsed.issue_id:
            return self._delete_issue(key, parsed.issue_id, revision)
        if parsed.section is Section.DESIRED:
            current = self.desired.get(key)
            if current is None or current.mod_revision >= revision:
                return None
            if current.deleted:
                return None
            if current.resource is not None and current.error is None:
                self.desired[key] = DesiredEntry(
                    key=key, mod_revision=revision, resource=current.resource, deleted=True
                )
            else:
                del self.desired[key]
        elif parsed.section is Section.ACTUAL:
            current_actual = self.actual.get(key)
            if current_actual is None or current_actual.mod_revision >= revision:
                return None
            del self.actual[key]
        else:
            return None
        return Change(resource=key)

    def forget_tombstone(self, key: ResourceKey, revision: int) -> None:
        """Drop the tombstone for `key` once its teardown is done, unless the key was re-created."""
        entry = self.desired.get(key)
        if entry is not None and entry.deleted and entry.mod_revision == revision:
            del self.desired[key]

    def replace(self, kvs: list[KeyValue], revision: int) -> list[Change]:
        """Reconcile the cache with a full list at `revision`: puts for what is new or changed,
        synthesised deletes for what vanished. Returns every change."""
        changes: list[Change] = []
        seen_desired: set[ResourceKey] = set()
        seen_actual: set[ResourceKey] = set()
        seen_approvals: set[str] = set()
        seen_issues: set[tuple[ResourceKey, str]] = set()
        for kv in kvs:
            parsed = self._keys.parse(kv.key)
            if parsed is not None and parsed.plan_id:
                seen_approvals.add(parsed.plan_id)
            if parsed is not None and parsed.resource is not None:
                if parsed.issue_id:
                    seen_issues.add((parsed.resource, parsed.issue_id))
                elif parsed.section is Section.DESIRED:
                    seen_desired.add(parsed.resource)
                elif parsed.section is Section.ACTUAL:
                    seen_actual.add(parsed.resource)
            change = self.apply_put(kv)
            if change is not None:
                changes.append(change)
        for key in [k for k, e in self.desired.items() if k not in seen_desired and not e.deleted]:
            change = self.apply_delete(self._keys.desired(key).encode(), revision)
            if change is not None:
                changes.append(change)
        for key in [k for k in self.actual if k not in seen_actual]:
            change = self.apply_delete(self._keys.actual(key).encode(), revision)
            if change is not None:
                changes.append(change)
        for plan_id in [p for p in self.approvals if p not in seen_approvals]:
            change = self.apply_delete(self._keys.approval(plan_id).encode(), revision)
            if change is not None:
                changes.append(change)
        for key, issue_id in [k for k in self._issue_revisions if k not in seen_issues]:
            change = self.apply_delete(self._keys.issue(key, issue_id).encode(), revision)
            if change is not None:
                changes.append(change)
        self.revision = max(self.revision, revision)
        return changes

    def relist(
        self, kvs: list[KeyValue], statuses: list[KeyValue], revision: int
    ) -> tuple[list[Change], list[ResourceKey]]:
        """A full list at `revision` (`replace`), then tombstones for what `statuses` say setpoint had applied
        and is no longer desired. Returns every change, and the keys whose status has no desired value (to be
        torn down or cleared)."""
        changes = self.replace(kvs, revision)
        orphans: dict[ResourceKey, tuple[Resource | None, int | None]] = {}
        for kv in statuses:
            parsed = self._keys.parse(kv.key)
            if parsed is None or parsed.resource is None:
                continue
            entry = self.desired.get(parsed.resource)
            if entry is None or entry.deleted:
                orphans[parsed.resource] = applied_from_status(kv.value)
        applied = {key: (resource, at) for key, (resource, at) in orphans.items() if resource is not None}
        return changes + self.restore_tombstones(applied, revision), list(orphans)

    def restore_tombstones(
        self, applied: dict[ResourceKey, tuple[Resource, int | None]], revision: int
    ) -> list[Change]:
        """Tombstones for resources setpoint had applied whose desired key is gone: at the revision of the
        deletion when a status written for it says so, else at `revision` (deleted while setpoint was down)."""
        changes: list[Change] = []
        for key, (resource, deleted_at) in applied.items():
            if key in self.desired or resource.key != key:
                continue
            at = deleted_at if deleted_at is not None else revision
            self.desired[key] = DesiredEntry(key=key, mod_revision=at, resource=resource, deleted=True)
            changes.append(Change(resource=key))
        return changes

    @staticmethod
    def _rejected(key: bytes, parsed: ParsedKey) -> Change:
        return Change(resource=None, rejected_key=key.decode("utf-8", "replace")[:200], reason=parsed.error)
