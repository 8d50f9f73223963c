"""The plan cache: the same question to a model gets the same validated answer, without a call.

A model-made plan is cached under a key that covers everything the answer
may depend on: the agent, the resource (kind/name), the task (the prompt and
what it asks: heal, reconcile or retire), the desired spec (canonical JSON),
the diff between desired and actual (also canonical), the fingerprints of
the issue and of every open issue (what they say, not when they were
reported or how often), and the tool catalogue's version (the tools' names,
risks and parameter schemas). What is cached is the model's accepted
answer, validated again whenever it is used, or the reason no valid plan
could be had, so a flapping key whose inputs repeat asks a model once
per TTL rather than once per flap, and a question that failed is not asked
again until the TTL passes or an input changes.

Entries live `ttl_seconds` (settable: `llm.plan_cache.ttl_seconds`, default
600 s) and the oldest are dropped beyond `max_entries` (default 1000). A
cached plan is bound to the snapshot it is used for and is gated like any
other: the cache saves a model call, never a check.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import JsonValue

from plans import Issue

# Issue details that say when, or how often, not what: two reports of one problem share a fingerprint.
_VOLATILE_DETAILS = frozenset(
    {"starts_at", "ends_at", "reported_at", "fingerprint", "generator_url", "value", "values", "count"}
)


@dataclass(frozen=True, slots=True)
class CachedPlan:
    """A validated answer (the model's `arguments` and the `planner` that gave them), or `failure`: why none
    could be had. The arguments are validated again when the entry is used: the cache saves a call, not a check."""

    arguments: dict[str, JsonValue] | None = None
    planner: str = ""
    failure: str | None = None


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def issue_fingerprint(issue: Issue | None) -> str:
    if issue is None:
        return ""
    details = {k: v for k, v in issue.details.items() if k not in _VOLATILE_DETAILS}
    return canonical([issue.summary, issue.severity, issue.source, details])


def cache_key(
    *, agent: str, resource: str, task: str, spec: dict[str, JsonValue], diff: Sequence[JsonValue],
    issue: Issue | None, open_issues: Sequence[Issue], catalogue: str,
) -> str:  # fmt: skip
    parts = [
        agent, resource, task, canonical(spec), canonical(list(diff)), issue_fingerprint(issue),
        canonical([issue_fingerprint(i) for i in open_issues]), catalogue,
    ]  # fmt: skip
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


class PlanCache:
    def __init__(
        self, *, ttl_seconds: float = 600.0, max_entries: int = 1000, now: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._now = now
        self._entries: OrderedDict[str, tuple[float, CachedPlan]] = OrderedDict()

    def get(self, key: str) -> CachedPlan | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, plan = found
        if self._now() >= expires:
            del self._entries[key]
            return None
        return plan

    def put(self, key: str, plan: CachedPlan) -> None:
        self._entries[key] = (self._now() + self._ttl, plan)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
