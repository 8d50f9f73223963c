"""The built-in `file` agent: keeps files at a desired content and mode.

Desired spec: `{"path": absolute path, "content": string, "mode": "0644"}`
(mode optional, default "0644"). Observed state: `{"exists", "sha256", "mode"}`.
Planning is by rules: write the file when it is missing or its content or
mode differ; delete it (a high-risk step) when the desired resource is
deleted. An issue reported on a file is healed by repairing drift, if the
file differs; otherwise no rule covers it: with a language-model planner
(`fallback`), the model is asked, else `heal` says so and the issue is
`unhealable`. A model's step may touch only this resource's file, may not
delete it, and may write only the desired content and mode (`in_scope`).
Paths must lie inside `allowed_roots`; anything else is an invalid
resource and nothing is planned. The path is checked (it resolves symlinks)
in a thread, never on the event loop: in the same thread hop as the
observation, whose result the plan made next from that observation takes
(`_parsed`), so a reconcile costs one hop before its plan, not two.

A valid file resource claims its path as written (`file:` + the normalised
path), so two resources that name one file are both reported; two spellings
of one file through a symlink are not caught by that.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from agents.llm import ModelPlanner
from plans import ExecutionPlan, InvalidResourceError, Issue, Resource, ResourceKey, Snapshot, Step
from plans.errors import describe_validation_error
from tools import Tool
from tools.builtin.files import MODE_PATTERN, FileDelete, FileWrite, file_tools, parse_mode, stat_file
from tools.paths import PathNotAllowedError, confine

NO_RULE = "no rule covers this issue"
# Parsed resources an observation left for the plan made from it, kept for a plan that never comes (a poll
# pass observes without planning) until this many newer ones push them out.
PARSED_KEPT = 256


class FileSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    path: str = Field(min_length=1)
    content: str
    mode: str = Field(default="0644", pattern=MODE_PATTERN)

    @property
    def normalized_mode(self) -> str:
        return f"{parse_mode(self.mode):04o}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def _spec_error(error: ValidationError) -> str:
    first = error.errors()[0]
    if first["loc"] == ("mode",) and first["type"] == "string_type":  # YAML reads an unquoted 0644 as 420
        return 'spec.mode must be a quoted octal string such as "0644" (unquoted, YAML reads it as a number)'
    return describe_validation_error(
        error,
        what=None,
        prefix="spec.",
        unknown="is not a known field (expected path, content, mode)",
        explain={"string_pattern_mismatch": 'must be an octal mode such as "0644"'},
    )


class FileAgent:
    name = "file"
    kinds = frozenset({"file"})

    def __init__(self, *, allowed_roots: Sequence[str], fallback: ModelPlanner | None = None) -> None:
        self._roots = tuple(allowed_roots)
        self._tools = file_tools(allowed_roots=self._roots)
        self._fallback = fallback
        self._parsed: dict[ResourceKey, tuple[Resource, FileSpec, Path]] = {}

    def tools(self) -> Sequence[Tool]:
        return self._tools

    def parse(self, desired: Resource, *, resolve: Callable[[str], str] = os.path.realpath) -> tuple[FileSpec, Path]:
        """The validated spec and confined path, or InvalidResourceError saying what is wrong (`resolve`: see
        `confine`)."""
        try:
            spec = FileSpec.model_validate(desired.spec)
        except ValidationError as e:
            raise InvalidResourceError(_spec_error(e)) from None
        try:
            path = confine(spec.path, self._roots, resolve=resolve)
        except PathNotAllowedError as e:
            raise InvalidResourceError(f"spec.path: {e}") from None
        if path.is_dir():  # no plan could ever turn it into the file: say so, rather than fail forever
            raise InvalidResourceError(f"spec.path: {path} is a directory; a file resource manages one regular file")
        return spec, path

    def validate(self, desired: Resource) -> None:
        self.parse(desired)

    def claims(self, desired: Resource) -> frozenset[str]:
        """The file's path, normalised, when the spec is valid and the path lies inside a root as written."""
        try:
            path = FileSpec.model_validate(desired.spec).path
        except ValidationError:
            return frozenset()
        if not os.path.isabs(path) or "\x00" in path:
            return frozenset()
        normal = os.path.normpath(path)
        if not any(normal.startswith(os.path.normpath(root) + os.sep) for root in self._roots):
            return frozenset()  # refused when planned, for its own reason: it claims nothing
        return frozenset({f"file:{normal}"})

    async def observe(self, desired: Resource) -> dict[str, JsonValue]:
        spec, path, state = await asyncio.to_thread(self._observe, desired)
        if len(self._parsed) >= PARSED_KEPT:
            del self._parsed[next(iter(self._parsed))]
        self._parsed[desired.key] = (desired, spec, path)
        return state

    async def observe_many(self, desired: Sequence[Resource]) -> list[dict[str, JsonValue] | Exception]:
        """Every one of `desired` observed in one thread (a poll pass): 65 us a file, against 305 us for one
        thread hop each, 32 at a time."""
        return await asyncio.to_thread(self._observe_many, desired)

    def _observe_many(self, desired: Sequence[Resource]) -> list[dict[str, JsonValue] | Exception]:
        # The batch resolves each directory (the roots, a file's parent) once: realpath was 53 of a file's 65 us.
        # Its answers are as old as the batch (a few milliseconds), as one observation's are as old as itself.
        resolve = functools.lru_cache(maxsize=64)(os.path.realpath)
        states: list[dict[str, JsonValue] | Exception] = []
        for resource in desired:
            try:
                states.append(self._observe(resource, resolve=resolve)[2])
            except Exception as e:  # this resource's answer, as `observe` would raise it
                states.append(e)
        return states

    def _observe(
        self, desired: Resource, *, resolve: Callable[[str], str] = os.path.realpath
    ) -> tuple[FileSpec, Path, dict[str, JsonValue]]:
        spec, path = self.parse(desired, resolve=resolve)
        return spec, path, stat_file(path)

    async def _parse(self, desired: Resource) -> tuple[FileSpec, Path]:
        """`parse`, taken from the observation of this very value just made when there was one (its path was
        checked a moment ago, in that observation's thread), else in a thread of its own."""
        kept = self._parsed.pop(desired.key, None)
        if kept is not None and kept[0] is desired:
            return kept[1], kept[2]
        return await asyncio.to_thread(self.parse, desired)

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        spec, path = await self._parse(snapshot.desired)
        return self._repair(snapshot, spec, path)

    def _repair(self, snapshot: Snapshot, spec: FileSpec, path: Path) -> ExecutionPlan:
        """The plan that restores `spec` at `path` as observed in `snapshot` (empty when nothing differs)."""
        state = snapshot.actual.state if snapshot.actual is not None else {}
        drift = self._drift(spec, state)
        steps: tuple[Step, ...] = ()
        if drift:
            steps = (
                Step(
                    tool=FileWrite.name,
                    parameters={"path": str(path), "content": spec.content, "mode": spec.normalized_mode},
                    description=f"write {path} ({drift})",
                    risk=FileWrite.risk,
                ),
            )
        reasoning = drift or "file matches the desired content and mode"
        return snapshot.plan(agent=self.name, steps=steps, reasoning=reasoning)

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        _, path = await self._parse(snapshot.desired)
        if snapshot.actual is not None and snapshot.actual.state.get("exists") is False:
            return snapshot.plan(agent=self.name, reasoning="file is already absent")
        step = Step(
            tool=FileDelete.name,
            parameters={"path": str(path)},
            description=f"delete {path}: its desired resource was deleted",
            risk=FileDelete.risk,
        )
        return snapshot.plan(agent=self.name, steps=(step,), reasoning="desired resource deleted")

    async def diff(self, snapshot: Snapshot) -> str:
        """A unified diff of content and mode, when the file can be read here; else what differs, by hash."""
        spec, path = await asyncio.to_thread(self.parse, snapshot.desired)
        state = snapshot.actual.state if snapshot.actual is not None else {}
        if snapshot.deleted:
            return f"delete {path}" if state.get("exists") is not False else ""
        return await asyncio.to_thread(_diff, spec, path, state)

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        """Drift is all the rules repair: the plan that restores the desired content and mode, if the file
        (observed afresh by the reconcile the issue started) differs. Else the model, when there is one, is
        asked; else no plan, saying so."""
        spec, path = await self._parse(snapshot.desired)
        plan = self._repair(snapshot, spec, path)
        if not plan.is_empty:
            return plan.model_copy(update={"reasoning": f"{issue.summary}: {plan.reasoning}"})
        if self._fallback is None:  # the file is as desired: whatever is wrong, the rules cannot fix it
            return snapshot.plan(agent=self.name, reasoning=f"{NO_RULE}: {plan.reasoning}")
        offered = [tool for tool in self._tools if tool.name != FileDelete.name]  # never a heal of its own file
        return await self._fallback.heal(
            issue, snapshot, agent=self.name, tools=offered, rules_said=f"{NO_RULE}: {plan.reasoning}",
            scope=lambda step: self.in_scope(step, spec=spec, path=path), drift=[],
        )  # fmt: skip

    @staticmethod
    def in_scope(step: Step, *, spec: FileSpec, path: Path) -> str | None:
        """Why a model's `step` for the resource with `spec` (at the confined `path`) is outside what it may
        touch, or None: only its own file, never deleted, and written only with the desired content and mode."""
        target = step.parameters.get("path")
        if not isinstance(target, str) or os.path.normpath(target) not in {str(path), os.path.normpath(spec.path)}:
            return f"this resource manages {spec.path} only; a step for it may not touch another path"
        if step.tool == FileDelete.name:
            return "deleting the file this resource keeps cannot heal it"
        if step.tool == FileWrite.name:
            mode = step.parameters.get("mode", "0644")
            if step.parameters.get("content") != spec.content or not isinstance(mode, str) or (
                parse_mode(mode) != parse_mode(spec.mode)
            ):
                return "file.write may write only the desired content and mode of this resource"
        return None

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)

    @staticmethod
    def _drift(spec: FileSpec, state: dict[str, JsonValue]) -> str:
        if not state:
            return "not observed yet"
        if state.get("exists") is not True:
            return "file is missing"
        if state.get("sha256") != spec.sha256:
            return "content differs"
        if state.get("mode") != spec.normalized_mode:
            return f"mode is {state.get('mode')}, want {spec.normalized_mode}"
        return ""




MAX_DIFF_LINES = 200
MAX_DIFF_READ_BYTES = 1 << 20


def _diff(spec: FileSpec, path: Path, state: dict[str, JsonValue]) -> str:
    """The diff for `setpoint plan`: the local file when it is the one observed, else a summary by hash."""
    lines: list[str] = []
    current: str | None = None
    exists = state.get("exists") if state else os.path.lexists(path)
    if exists:
        try:
            data = path.read_bytes()[: MAX_DIFF_READ_BYTES + 1]
            if not state or hashlib.sha256(data).hexdigest() == state.get("sha256"):
                current = data.decode("utf-8") if len(data) <= MAX_DIFF_READ_BYTES else None
        except (OSError, UnicodeDecodeError):
            current = None
        mode = state.get("mode") if state else f"{os.lstat(path).st_mode & 0o7777:04o}"
        if mode != spec.normalized_mode:
            lines.append(f"mode {mode} -> {spec.normalized_mode}")
    if not exists:
        current = ""
        lines.append(f"new file {path} (mode {spec.normalized_mode})")
    if current is None:
        if state.get("sha256") != spec.sha256:
            lines.append(f"content differs (sha256 {str(state.get('sha256'))[:12]} -> {spec.sha256[:12]}); "
                         f"{path} cannot be read here for a line diff")  # fmt: skip
        return "\n".join(lines)
    if current != spec.content:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), spec.content.splitlines(keepends=True),
            fromfile=f"{path} (actual)", tofile=f"{path} (desired)",
        )  # fmt: skip
        body = [line.rstrip("\n") for line in diff]
        if len(body) > MAX_DIFF_LINES:
            body = [*body[:MAX_DIFF_LINES], f"... {len(body) - MAX_DIFF_LINES} more lines"]
        lines += body
    return "\n".join(lines)
