"""Alerts in: Alertmanager's webhook payload (version 4) turned into issues.

Each firing alert labelled `setpoint_kind` and `setpoint_name` becomes the
issue `issues/<kind>/<name>/<fingerprint>`: its summary from the `summary`
annotation (else `description`, else the alert's name), its severity from
the `severity` label (`critical` and `page` are critical, `info`, `low` and
`none` are info, anything else is a warning), its source
`alertmanager/<alertname>`, and the alert's labels, annotations, start and
link in `details`. A resolved alert deletes its issue, unless the issue is of a later firing of
the same alert (another `startsAt`): a late resolved notification does not
close it.

A firing is one report (an issue is healed once per report): while an
issue from the same firing (the same `startsAt`) is stored, the alert is
`unchanged` and not written again, so neither Alertmanager's repeats nor
annotations that change as the alert keeps firing (a `{{ $value }}` in the
summary) start another heal. Alerts without both labels are
counted as `ignored`; with labels that are not valid names, as `invalid`.

`parse` checks the whole payload before anything is written: a malformed one
is refused with one sentence and changes nothing. `apply` then writes every
change in as few transactions as etcd allows.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from plans import NAME_PATTERN, Issue, ResourceKey
from reconciler.keys import KeySpace
from reconciler.store import Delete, EtcdStore, Guard, Op, Put, StoreError

KIND_LABEL = "setpoint_kind"
NAME_LABEL = "setpoint_name"
RESULTS = ("reported", "resolved", "unchanged", "ignored", "invalid")  # what became of each alert
MAX_ALERTS = 1000
MAX_TEXT_CHARS = 1024  # of one label or annotation value kept in an issue's details
MAX_PAIRS = 64  # labels or annotations kept in an issue's details
MAX_ISSUE_BYTES = 64 * 1024  # of one issue's value
CHUNK = 16  # alerts per transaction: 16 issues at most MAX_ISSUE_BYTES are well under etcd's 1.5 MiB request
ATTEMPTS = 3

Severity = Literal["info", "warning", "critical"]
_SEVERITY: dict[str, Severity] = {
    "critical": "critical", "page": "critical", "info": "info", "low": "info", "none": "info"
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Change:
    key: ResourceKey
    issue_id: str
    issue: Issue | None  # None: resolved
    starts_at: str | None = None  # the firing it is about


@dataclass(slots=True)
class Batch:
    """What one payload asks for: the issue changes, and how many alerts were set aside."""

    changes: dict[tuple[ResourceKey, str], Change] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)


def severity(label: str | None) -> Severity:
    """An issue severity (info, warning, critical) for an alert's `severity` label."""
    return _SEVERITY.get((label or "").strip().lower(), "warning")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


def _pairs(value: object, where: str) -> dict[str, str] | str:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return f"{where} must be an object of strings"
    return {k[:200]: _cut(v) for k, v in sorted(value.items())[:MAX_PAIRS]}


def parse(raw: bytes) -> Batch | str:
    """The changes a webhook body asks for, or what is wrong with it (one sentence)."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        return "the request body is not valid JSON"
    if not isinstance(payload, dict):
        return "the request body must be a JSON object (Alertmanager's webhook payload)"
    version = payload.get("version")
    if version != "4":
        given = json.dumps(version)[:20] if "version" in payload else "none"
        return f'unsupported payload version {given}: setpoint takes Alertmanager\'s webhook payload, "version": "4"'
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        return "the payload has no 'alerts' list"
    if len(alerts) > MAX_ALERTS:
        return f"the payload holds {len(alerts)} alerts, more than the {MAX_ALERTS} setpoint takes at once"
    batch = Batch()
    for index, alert in enumerate(alerts):
        refused = _add(batch, alert, f"alerts[{index}]")
        if refused is not None:
            return refused
    return batch


def _add(batch: Batch, alert: Any, where: str) -> str | None:
    if not isinstance(alert, dict):
        return f"{where} must be an object"
    status = alert.get("status")
    if status not in ("firing", "resolved"):
        return f"{where}.status must be 'firing' or 'resolved'"
    labels = _pairs(alert.get("labels"), f"{where}.labels")
    if isinstance(labels, str):
        return labels
    annotations = _pairs(alert.get("annotations"), f"{where}.annotations")
    if isinstance(annotations, str):
        return annotations
    for name in ("fingerprint", "startsAt", "generatorURL"):
        if alert.get(name) is not None and not isinstance(alert.get(name), str):
            return f"{where}.{name} must be a string"
    if KIND_LABEL not in labels or NAME_LABEL not in labels:
        batch.counts["ignored"] += 1
        return None
    try:
        key = ResourceKey(kind=labels[KIND_LABEL], name=labels[NAME_LABEL])
    except ValueError:
        batch.counts["invalid"] += 1
        return None
    fingerprint = alert.get("fingerprint") or hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16]
    issue_id = fingerprint.lower()
    if NAME_PATTERN.fullmatch(issue_id) is None:
        batch.counts["invalid"] += 1
        return None
    issue = None
    if status == "firing":
        alertname = labels.get("alertname", "unnamed")
        issue = Issue(
            summary=annotations.get("summary") or annotations.get("description") or alertname,
            severity=severity(labels.get("severity")),
            source=f"alertmanager/{alertname[:100]}",
            details={
                "alertname": alertname, "fingerprint": fingerprint, "starts_at": alert.get("startsAt"),
                "generator_url": alert.get("generatorURL"), "labels": labels, "annotations": annotations,
            },
        )  # fmt: skip
    # A later alert for the same issue wins.
    batch.changes[(key, issue_id)] = Change(key, issue_id, issue, alert.get("startsAt"))
    return None


def _stored(value: bytes) -> Issue | None:
    try:
        return Issue.model_validate_json(value)
    except ValueError:
        return None  # not readable: replaced, or deleted


def _same_firing(stored: bytes, issue: Issue) -> bool:
    """Whether `stored` is the issue of the same firing as `issue` (same source and start)."""
    before = _stored(stored)
    return (
        before is not None
        and before.source == issue.source
        and before.details.get("starts_at") == issue.details.get("starts_at")
    )


def _resolves(stored: bytes, starts_at: str | None) -> bool:
    """Whether a resolved alert that started at `starts_at` ends the stored issue: not when the issue is of a
    later firing of the same alert (a late resolved notification must not close it)."""
    before = _stored(stored)
    stored_start = before.details.get("starts_at") if before is not None else None
    return stored_start is None or starts_at is None or stored_start == starts_at


def encode(issue: Issue) -> bytes:
    """The issue's value: at most MAX_ISSUE_BYTES, the alert's labels and annotations left out of `details`
    when they would make it larger."""
    value = _json(issue)
    if len(value) > MAX_ISSUE_BYTES:
        kept = {k: v for k, v in issue.details.items() if k not in ("labels", "annotations")}
        value = _json(issue.model_copy(update={"details": {**kept, "details_cut": True}}))
    return value


def _json(issue: Issue) -> bytes:
    return json.dumps(issue.model_dump(mode="json"), separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


async def apply(store: EtcdStore, keys: KeySpace, batch: Batch) -> Counter[str]:
    """Write `batch`: put what fires and changed, delete what resolved. Returns every alert's result.

    A few alerts at a time, each transaction guarded by the revisions it read: when another delivery of the
    same alerts (Alertmanager in a cluster sends each one from every member) wrote first, the chunk is read
    and decided again, so one firing is written once. Each chunk stays well under etcd's request limit. If
    etcd fails midway, the chunks before are written; Alertmanager sends the notification again, and what
    is written already is then `unchanged`."""
    counts = Counter(batch.counts)
    changes = list(batch.changes.values())
    for start in range(0, len(changes), CHUNK):
        counts += await _apply_chunk(store, keys, changes[start : start + CHUNK])
    return counts


async def _apply_chunk(store: EtcdStore, keys: KeySpace, changes: list[Change]) -> Counter[str]:
    for _ in range(ATTEMPTS):
        counts: Counter[str] = Counter()
        current = await asyncio.gather(*(store.get(keys.issue(c.key, c.issue_id)) for c in changes))
        ops: list[Op] = []
        guards: list[Guard] = []
        for change, kv in zip(changes, current, strict=True):
            path = keys.issue(change.key, change.issue_id)
            if change.issue is None:
                if kv is None or not _resolves(kv.value, change.starts_at):
                    counts["unchanged"] += 1
                    continue
                ops.append(Delete(path))
                counts["resolved"] += 1
            elif kv is not None and _same_firing(kv.value, change.issue):
                counts["unchanged"] += 1
                continue
            else:
                ops.append(Put(path, encode(change.issue)))
                counts["reported"] += 1
            guards.append(Guard(path, kv.mod_revision if kv is not None else 0))
        if not ops or await store.txn(guard=guards, then=ops):
            return counts
    raise StoreError(f"the issues these alerts are about kept changing while they were written ({ATTEMPTS} tries)")
