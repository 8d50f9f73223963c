"""The built-in `file` agent: keeps files at a desired content and mode.

Desired spec: `{"path": absolute path, "content": string, "mode": "0644"}`
(mode optional, default "0644"). Observed state: `{"exists", "sha256", "mode"}`.
Planning is by rules: write the file when it is missing or its content or
mode differ; delete it (a high-risk step) when the desired resource is
deleted. Paths must lie inside `allowed_roots`; anything else is an invalid
resource and nothing is planned.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from plans import ExecutionPlan, InvalidResourceError, Issue, Observed, Resource, Step
from tools import Tool
from tools.builtin.files import MODE_PATTERN, FileDelete, FileWrite, file_tools, parse_mode, stat_file
from tools.paths import PathNotAllowedError, confine


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
    item = error.errors()[0]
    where = ".".join(str(p) for p in item["loc"])
    if len(where) > 60:
        where = where[:60] + "..."
    if item["type"] == "missing":
        return f"spec.{where} is required"
    if item["type"] == "extra_forbidden":
        return f"spec.{where} is not a known field (expected path, content, mode)"
    if item["type"] == "string_pattern_mismatch":
        return f"spec.{where} must be an octal mode such as \"0644\""
    return f"spec.{where}: {item['msg']}"


class FileAgent:
    name = "file"
    kinds = frozenset({"file"})

    def __init__(self, *, allowed_roots: Sequence[str]) -> None:
        self._roots = tuple(allowed_roots)
        self._tools = file_tools(allowed_roots=self._roots)

    def tools(self) -> Sequence[Tool]:
        return self._tools

    def parse(self, desired: Resource) -> tuple[FileSpec, Path]:
        """The validated spec and confined path, or InvalidResourceError saying what is wrong."""
        try:
            spec = FileSpec.model_validate(desired.spec)
        except ValidationError as e:
            raise InvalidResourceError(_spec_error(e)) from None
        try:
            path = confine(spec.path, self._roots)
        except PathNotAllowedError as e:
            raise InvalidResourceError(f"spec.path: {e}") from None
        return spec, path

    async def observe(self, desired: Resource) -> dict[str, JsonValue]:
        _, path = self.parse(desired)
        return await asyncio.to_thread(stat_file, path)

    async def reconcile(self, desired: Resource, actual: Observed | None) -> ExecutionPlan:
        spec, path = self.parse(desired)
        state = actual.state if actual is not None else {}
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
        return ExecutionPlan(
            agent=self.name,
            resource=desired.key,
            steps=steps,
            reasoning=drift or "file matches the desired content and mode",
            desired_revision=0,
        )

    async def retire(self, last: Resource, actual: Observed | None) -> ExecutionPlan:
        _, path = self.parse(last)
        if actual is not None and actual.state.get("exists") is False:
            return ExecutionPlan(
                agent=self.name, resource=last.key, reasoning="file is already absent", desired_revision=0
            )
        step = Step(
            tool=FileDelete.name,
            parameters={"path": str(path)},
            description=f"delete {path}: its desired resource was deleted",
            risk=FileDelete.risk,
        )
        return ExecutionPlan(
            agent=self.name,
            resource=last.key,
            steps=(step,),
            reasoning="desired resource deleted",
            desired_revision=0,
        )

    async def heal(self, issue: Issue, desired: Resource | None, actual: Observed | None) -> ExecutionPlan:
        if desired is None:
            raise InvalidResourceError(f"issue {issue.summary!r} names a file with no desired state")
        plan = await self.reconcile(desired, actual)
        return plan.model_copy(update={"reasoning": f"{issue.summary}: {plan.reasoning}"})

    async def plan(self, desired: Resource, actual: Observed | None) -> ExecutionPlan:
        return await self.reconcile(desired, actual)

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


