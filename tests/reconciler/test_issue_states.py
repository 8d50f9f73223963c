"""How a status's issue list follows the plans that answer issues (`reconciler/issues.py`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from plans import Issue, ResourceKey
from reconciler.cache import IssueEntry, parse_issue
from reconciler.issues import MAX_LISTED_ISSUES, IssueMark, IssueState, merge, newly, ref, unhandled
from reconciler.store import KeyValue

KEY = ResourceKey(kind="file", name="motd")
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def entry(issue_id: str, revision: int, summary: str = "broken", *, created: int | None = None) -> IssueEntry:
    value = json.dumps(Issue(summary=summary, source="test").model_dump(mode="json")).encode()
    kv = KeyValue(f"/p/issues/file/motd/{issue_id}".encode(), value, revision, created or revision)
    parsed, error = parse_issue(KEY, issue_id, kv)
    assert parsed is not None, error
    return parsed


def test_a_new_issue_is_open_and_a_resolved_one_leaves_the_list() -> None:
    a, b = entry("a", 5), entry("b", 6)
    listed = merge([], [a, b], now=T0)
    assert [(s.id, s.state) for s in listed] == [("a", IssueState.OPEN), ("b", IssueState.OPEN)]
    assert [s.id for s in merge(listed, [b], now=T0)] == ["b"]


def test_the_state_follows_the_plan_that_answers_the_issue() -> None:
    a = entry("a", 5)
    healing = merge([], [a], now=T0, plan_id="p1", plan_state=IssueState.HEALING, answers=[ref(a)])
    assert (healing[0].state, healing[0].plan_id) == (IssueState.HEALING, "p1")
    # Later writes about p1 name no answers: the plan id is enough.
    later = T0 + timedelta(seconds=5)
    failed = merge(healing, [a], now=later, plan_id="p1", plan_state=IssueState.FAILED, message="step 1 failed")
    assert (failed[0].state, failed[0].message, failed[0].since) == (IssueState.FAILED, "step 1 failed", later)
    # Final for the report: another plan's writes do not touch it.
    other = merge(failed, [a], now=later, plan_id="p2", plan_state=IssueState.HEALING)
    assert other[0].state is IssueState.FAILED and other[0].plan_id == "p1"
    assert unhandled(other, [a]) == []


def test_a_plan_that_no_longer_runs_leaves_its_issue_open_again() -> None:
    a = entry("a", 5)
    waiting = merge([], [a], now=T0, plan_id="p1", plan_state=IssueState.AWAITING_APPROVAL, answers=[ref(a)])
    # p1 was voided; the next plan is for something else: the issue waits for a heal of its own.
    reset = merge(waiting, [a], now=T0, plan_id="p2", plan_state=IssueState.HEALING)
    assert (reset[0].state, reset[0].plan_id) == (IssueState.OPEN, None)
    assert unhandled(reset, [a]) == [a]


def test_a_changed_value_is_a_new_report() -> None:
    a = entry("a", 5)
    done = merge([], [a], now=T0, marks=[IssueMark(a, IssueState.UNHEALABLE, "no rule covers this issue")])
    assert unhandled(done, [a]) == []
    changed = entry("a", 9, "broken again", created=5)
    assert changed.report != a.report
    assert unhandled(done, [changed]) == [changed]
    relisted = merge(done, [changed], now=T0)
    assert (relisted[0].state, relisted[0].summary) == (IssueState.OPEN, "broken again")
    # Removed and reported again with the same words: a new report too.
    recreated = entry("a", 12, created=12)
    assert recreated.report != a.report


def test_heals_are_counted_once_per_state_entered() -> None:
    a, b = entry("a", 5), entry("b", 6)
    before = merge([], [a, b], now=T0)
    after = merge(before, [a, b], now=T0, marks=[IssueMark(a, IssueState.UNHEALABLE), IssueMark(b, IssueState.BLOCKED)])
    assert sorted(newly(before, after)) == [IssueState.BLOCKED, IssueState.UNHEALABLE]
    assert newly(after, merge(after, [a, b], now=T0)) == []


def test_only_the_issues_a_status_can_list_are_healed() -> None:
    many = [entry(f"i{n}", n + 1) for n in range(MAX_LISTED_ISSUES + 5)]
    assert len(merge([], many, now=T0)) == MAX_LISTED_ISSUES
    assert unhandled([], many) == many[:MAX_LISTED_ISSUES]
