"""What setpoint did about each open issue of a resource, as the resource's status lists it.

An issue (`issues/<kind>/<name>/<id>`) is a problem reported by a probe, by
Alertmanager or by a person. The status of the resource lists every open
issue with its state, and that list is rebuilt from the cache at each status
write, so a resolved issue leaves it and a new one joins it as `open`:

- `open`: reported; nothing done about it yet;
- `healing`: a plan that answers it runs (`plan_id`);
- `awaiting_approval`: that plan waits for a person;
- `healed`: the plan succeeded;
- `failed`: the plan failed, or the agent's plan for it could not be run;
- `blocked`: a plan for it was held back (denied, rejected, expired, the
  flap guard or a limit); it is tried again, like any plan held back;
- `unhealable`: the agent has no plan for it (`message` says why).

A report is healed once: `healed`, `failed` and `unhealable` are final for
it. A status lists the oldest MAX_LISTED_ISSUES open issues; the others are
healed once earlier ones are resolved. A changed value, or an issue removed and reported again, is a new report
(`IssueEntry.report`) and starts over as `open`. The state follows the plan
that answers the issue: every status write about that plan moves it (see
`merge`), so the runner and the approvals need not know about issues.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from plans import Issue, IssueRef

if TYPE_CHECKING:  # the cache imports the status, which imports this
    from reconciler.cache import IssueEntry

MAX_LISTED_ISSUES = 100  # per status; later ones wait, unhealed, until earlier ones are resolved
MAX_SUMMARY_CHARS = 200
MAX_ISSUE_MESSAGE_CHARS = 300


class IssueState(StrEnum):
    OPEN = "open"
    HEALING = "healing"
    AWAITING_APPROVAL = "awaiting_approval"
    HEALED = "healed"
    FAILED = "failed"
    BLOCKED = "blocked"
    UNHEALABLE = "unhealable"


DONE = frozenset({IssueState.HEALED, IssueState.FAILED, IssueState.UNHEALABLE})  # final for a report
HEALS = (IssueState.HEALED, IssueState.FAILED, IssueState.UNHEALABLE, IssueState.BLOCKED)  # setpoint_heals_total
_WITH_MESSAGE = frozenset({IssueState.HEALED, IssueState.FAILED, IssueState.BLOCKED, IssueState.UNHEALABLE})


class IssueStatus(BaseModel):
    """One open issue as the status lists it."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    report: str
    summary: str
    severity: str
    source: str
    state: IssueState = IssueState.OPEN
    plan_id: str | None = None
    message: str = ""
    since: datetime

    def done(self, entry: IssueEntry) -> bool:
        """Whether this says that `entry`'s report was dealt with for good."""
        return self.id == entry.id and self.report == entry.report and self.state in DONE


@dataclass(frozen=True, slots=True)
class IssueMark:
    """What the reconciler found about one issue without running a plan (unhealable, failed, blocked)."""

    entry: IssueEntry
    state: IssueState
    message: str = ""
    plan_id: str | None = None  # the plan that answered it, when one did


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def merge(
    previous: Sequence[IssueStatus],
    open_issues: Sequence[IssueEntry],
    *,
    now: datetime,
    plan_id: str | None = None,
    plan_state: IssueState | None = None,
    answers: Collection[IssueRef] = (),
    message: str = "",
    marks: Sequence[IssueMark] = (),
) -> list[IssueStatus]:
    """The issue list of a status about to be written: one entry per open issue, oldest first.

    An issue keeps what `previous` said of the same report, unless: `marks` say otherwise; or the write is
    about plan `plan_id` (in `plan_state`) and the issue's report is among `answers` (those that plan answers) or
    was already answered by it; or it was waiting on, or being healed by, another plan, which is then no
    longer under way (a resource runs one plan at a time), so it is `open` again.
    """
    before = {status.id: status for status in previous}
    answered = {(ref.id, ref.report) for ref in answers}
    marked = {mark.entry.id: mark for mark in marks}
    merged: list[IssueStatus] = []
    for entry in open_issues[:MAX_LISTED_ISSUES]:
        old = before.get(entry.id)
        if old is not None and old.report != entry.report:
            old = None  # a new report: what was done about the old one does not carry over
        state = old.state if old is not None else IssueState.OPEN
        plan = old.plan_id if old is not None else None
        text = old.message if old is not None else ""
        mark = marked.get(entry.id)
        if mark is not None:
            state, text, plan = mark.state, mark.message, mark.plan_id
        elif plan_id is not None and plan_state is not None:
            if (entry.id, entry.report) in answered or (plan == plan_id and state not in DONE):
                state, plan, text = plan_state, plan_id, message
            elif state in (IssueState.HEALING, IssueState.AWAITING_APPROVAL):
                state, plan, text = IssueState.OPEN, None, ""
        if state not in _WITH_MESSAGE:
            text = ""
        changed = old is None or (old.state, old.plan_id) != (state, plan)
        merged.append(
            IssueStatus(
                id=entry.id, report=entry.report, summary=_cut(entry.issue.summary, MAX_SUMMARY_CHARS),
                severity=entry.issue.severity, source=_cut(entry.issue.source, MAX_SUMMARY_CHARS), state=state,
                plan_id=plan, message=_cut(text, MAX_ISSUE_MESSAGE_CHARS),
                since=now if changed or old is None else old.since,
            )
        )  # fmt: skip
    return merged


def newly(previous: Sequence[IssueStatus], current: Sequence[IssueStatus]) -> list[IssueState]:
    """The states issues entered between two lists (for `setpoint_heals_total`): final or `blocked` ones."""
    before = {(s.id, s.report): s.state for s in previous}
    return [s.state for s in current if s.state in HEALS and before.get((s.id, s.report)) is not s.state]


def problem_began(issue: Issue) -> datetime | None:
    """When the problem began, as its reporter says (`details.starts_at` from Alertmanager, `details.reported_at`
    from the CLI); None when it does not say."""
    for name in ("starts_at", "reported_at"):
        value = issue.details.get(name)
        if isinstance(value, str):
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                continue
            if when.tzinfo is not None:
                return when
    return None


def ref(entry: IssueEntry) -> IssueRef:
    """How a plan record names the report it answers."""
    return IssueRef(id=entry.id, report=entry.report, summary=_cut(entry.issue.summary, MAX_SUMMARY_CHARS))


def unhandled(statuses: Sequence[IssueStatus], open_issues: Sequence[IssueEntry]) -> list[IssueEntry]:
    """The open issues whose report has not been dealt with for good, oldest first."""
    by_id = {status.id: status for status in statuses}
    listed = open_issues[:MAX_LISTED_ISSUES]  # only what the status can say was done is healed
    return [e for e in listed if not (e.id in by_id and by_id[e.id].done(e))]
