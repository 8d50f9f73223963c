"""The etcd key space under the configured prefix (ARCHITECTURE.md §3).

One place builds and parses keys, so that no other module concatenates
strings into keys. Parsing never raises: a key that does not fit the layout
is reported as such and the caller decides what to do with it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from enum import StrEnum

from plans import NAME_PATTERN, ResourceKey

PLAN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


class Section(StrEnum):
    DESIRED = "desired"
    ACTUAL = "actual"
    ISSUES = "issues"
    STATUS = "status"
    PLANS = "plans"
    APPROVALS = "approvals"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    section: Section
    resource: ResourceKey | None
    error: str | None = None
    kind: str = ""
    name: str = ""
    plan_id: str = ""  # for approvals/<plan-id>
    issue_id: str = ""  # for issues/<kind>/<name>/<id>


_NAME = NAME_PATTERN.pattern
# The common key, `<section>/<kind>/<name>` of a resource, in one match (the general parse below says what is wrong
# with any other): parsing is on the path of every watch event.
_RESOURCE_KEY = re.compile(rf"(desired|actual|status)/({_NAME})/({_NAME})")
_SECTIONS = {section.value: section for section in Section}


class KeySpace:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.rstrip("/")
        self._head = self.prefix + "/"

    def section(self, section: Section) -> str:
        return f"{self.prefix}/{section.value}/"

    def resource(self, section: Section, key: ResourceKey) -> str:
        return f"{self.prefix}/{section.value}/{key.kind}/{key.name}"

    def desired(self, key: ResourceKey) -> str:
        return self.resource(Section.DESIRED, key)

    def actual(self, key: ResourceKey) -> str:
        return self.resource(Section.ACTUAL, key)

    def status(self, key: ResourceKey) -> str:
        return self.resource(Section.STATUS, key)

    def plan(self, plan_id: str) -> str:
        return f"{self.prefix}/{Section.PLANS.value}/{plan_id}"

    def approval(self, plan_id: str) -> str:
        return f"{self.prefix}/{Section.APPROVALS.value}/{plan_id}"

    def leader(self) -> str:
        """The elected daemon's key (`election.py`)."""
        return f"{self.prefix}/leader"

    def member(self, member_id: str) -> str:
        """A running daemon's key, under its lease."""
        return f"{self.prefix}/members/{member_id}"

    def issues(self, key: ResourceKey) -> str:
        """The prefix of every issue reported on `key`."""
        return self.resource(Section.ISSUES, key) + "/"

    def issue(self, key: ResourceKey, issue_id: str) -> str:
        return self.issues(key) + issue_id

    def parse(self, key: bytes) -> ParsedKey | None:
        """Split `<prefix>/<section>/<kind>/<name>`, `<prefix>/issues/<kind>/<name>/<id>` or
        `<prefix>/approvals/<plan-id>`; None for keys outside desired/actual/status/issues/approvals.

        A key in a known section whose kind or name is malformed comes back
        with `error` set and the raw segments, so it can be reported.
        """
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            return None
        head = self._head
        if not text.startswith(head):
            return None
        match = _RESOURCE_KEY.fullmatch(text, len(head))
        if match is not None:
            kind, name = sys.intern(match[2]), match[3]  # a few kinds, each shared by thousands of keys
            return ParsedKey(_SECTIONS[match[1]], ResourceKey(kind=kind, name=name), kind=kind, name=name)
        parts = text[len(head):].split("/")
        found = _SECTIONS.get(parts[0])
        if found is None:
            return None
        section = found
        if section is Section.APPROVALS:
            if len(parts) != 2 or PLAN_ID_PATTERN.fullmatch(parts[1]) is None:
                return ParsedKey(section, None, error="key is not approvals/<plan-id>")
            return ParsedKey(section, None, plan_id=parts[1])
        if section is Section.ISSUES:
            if len(parts) != 4:
                return ParsedKey(section, None, error="key is not issues/<kind>/<name>/<id>")
            if NAME_PATTERN.fullmatch(parts[3]) is None:
                return ParsedKey(
                    section, None, error=f"issue id must match {NAME_PATTERN.pattern}", kind=parts[1], name=parts[2]
                )
        elif section not in (Section.DESIRED, Section.ACTUAL, Section.STATUS):
            return None
        elif len(parts) != 3:
            return ParsedKey(section, None, error="key is not <section>/<kind>/<name>")
        kind, name = parts[1], parts[2]
        if NAME_PATTERN.fullmatch(kind) is None or NAME_PATTERN.fullmatch(name) is None:
            return ParsedKey(
                section, None, error=f"kind and name must match {NAME_PATTERN.pattern}", kind=kind, name=name
            )
        issue_id = parts[3] if section is Section.ISSUES else ""
        return ParsedKey(section, ResourceKey(kind=kind, name=name), kind=kind, name=name, issue_id=issue_id)
