"""The language-model planner: plans for what rules do not cover, from an untrusted model, checked by code.

Two ways in, both composed in `reconciler/assembly.py`, so the controller
never learns about models:

- a rule-based agent built with `fallback=ModelPlanner` asks it to heal an
  issue its rules have no plan for (the file agent's `unhealable` cases);
- a `ModelAgent` plans a kind that no rule-based agent handles, with the
  tools `llm.kinds.<kind>.tools` names.

Either way, the planner adds the tools it was given for the resource's kind
(`extra_tools`: declarative tools that name the kind) to the agent's own, so
no agent needs to know about them. A step using one of those is held to the
scope of a model-planned kind (`spec_scope`), whatever the agent's own scope
says about its own tools.

What the model sees: the system prompt and one task prompt
(`agents/prompts/*.md`), carrying the desired value, the actual state, a
JSON diff, the open issues and the tool catalogue (names, risks and the
JSON schemas of the tools' parameter models). Each is JSON between
`<data>` delimiters that no value can close, redacted first
(`llm_router/redact.py`: settable key patterns and common token formats),
and cut to `MAX_DATA_CHARS`. The model answers by calling `submit_plan`
with `{"reasoning", "steps": [{"tool", "parameters", "description", "risk"}]}`.

The answer is data. It is rejected, with a reason the rejection metric
counts, when: it does not match `submit_plan`'s schema (`schema`); it has
more than `max_steps` steps (`too_many_steps`); a step names a tool outside
the catalogue (`unknown_tool`); its parameters fail the tool's model
(`parameters`); it claims a lower risk than its tool's (`risk_understated`);
or the owning agent says a step is outside what this resource may touch
(`out_of_scope`). A rejected answer gets one repair turn, then the next
tier (the router's job); no valid answer from any tier is `PlanningFailed`,
and nothing runs. A valid plan is gated like any other; its `planner` is
`llm:<tier>:<provider>/<model>`, which the policy file can match.

Routing: the complexity features of the task (fields in the diff, the
issue's severity, candidate tools, earlier failed planning for this
resource, the agent's hint) give a score, and the score a tier
(`llm_router/complexity.py`). Before a model is asked, `on_planning` is
told (the daemon writes phase `Planning`). A validated plan, or the
failure to get one, is cached (`agents/plancache.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from string import Template

import structlog
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from agents.plancache import CachedPlan, PlanCache, cache_key, canonical
from llm_router import BudgetSpent, ChatMessage, InvalidAnswer, NoModelAnswered, NoValidAnswer, Tier, ToolSpec
from llm_router.complexity import Features, Score, score
from llm_router.redact import Redactor
from llm_router.router import Router
from plans import ExecutionPlan, Issue, PlanningFailed, PlanningUnavailable, ResourceKey, RiskLevel, Snapshot, Step
from plans.errors import describe_validation_error
from tools import Tool

log = structlog.get_logger("setpoint.llm")

PROMPTS = Path(__file__).parent / "prompts"
_PROMPTS = ("system", "heal", "reconcile")  # the files in PROMPTS, without .md
MAX_DATA_CHARS = 8000  # per data block: a large value costs tokens and tells a model little more
MAX_REASONING_CHARS = 2000

# Why an answer is rejected: the validator's reasons, and the router's for an answer with no call.
REJECTIONS = (
    "no_tool_call", "schema", "too_many_steps", "unknown_tool", "parameters", "risk_understated", "out_of_scope",
)  # fmt: skip

Scope = Callable[[Step], str | None]  # why a step is outside what the resource may touch, or None
OnPlanning = Callable[[Snapshot, str], Awaitable[None]]
# The validator the router is given: the accepted steps, the reasoning, and the arguments they came from.
_Validator = Callable[[dict[str, JsonValue]], tuple[tuple[Step, ...], str, dict[str, JsonValue]]]
# Parameters that name what a step acts on: a model-planned kind's mutating step may name only what its spec does.
TARGET_PARAMETERS = frozenset({"path", "paths", "url", "unit", "host", "target"})
WAIT_FOR_ACTUAL_SECONDS = 60.0

SUBMIT_PLAN = ToolSpec(
    name="submit_plan",
    description="Submit the plan for the resource: your reasoning and the tool calls to make, in order. "
    "Submit no steps when no tool in the catalogue can help.",
    parameters={
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "description": "What is wrong and why these steps fix it."},
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "tool": {"type": "string", "description": "A tool name from the catalogue."},
                        "parameters": {"type": "object", "description": "Arguments matching the tool's schema."},
                        "description": {"type": "string", "description": "What this step does, in a few words."},
                        "risk": {
                            "type": "string",
                            "enum": [level.value for level in RiskLevel],
                            "description": "Never lower than the tool's own risk.",
                        },
                    },
                    "required": ["tool", "parameters", "description", "risk"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["reasoning", "steps"],
        "additionalProperties": False,
    },
)


class _ProposedStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tool: str = Field(min_length=1, max_length=200)
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    description: str = Field(default="", max_length=1000)
    risk: RiskLevel


class _SubmitPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reasoning: str = Field(max_length=20_000)
    steps: list[_ProposedStep]


class Catalogue:
    """The tools offered to the model for one task, and a version that changes when any of them does."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self.entries: list[dict[str, JsonValue]] = [
            {
                "name": tool.name,
                "description": tool.description,
                "risk": tool.risk.value,
                "idempotent": tool.idempotent,
                "parameters": tool.parameters.model_json_schema(),
            }
            for tool in tools
        ]
        self.version = hashlib.sha256(canonical(self.entries).encode("utf-8")).hexdigest()

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)


def json_diff(desired: JsonValue, actual: JsonValue, path: str = "") -> list[JsonValue]:
    """Where `actual` differs from `desired`, over the keys `desired` names: `{"path", "desired", "actual"}`
    entries, `actual` null where it has no such key. Keys only `actual` has are observations, not drift."""
    if isinstance(desired, dict):
        found: list[JsonValue] = []
        actual_map = actual if isinstance(actual, dict) else {}
        for name in sorted(desired):
            found += json_diff(desired[name], actual_map.get(name), f"{path}/{name}")
        return found
    if desired != actual:
        return [{"path": path or "/", "desired": desired, "actual": actual}]
    return []


class ModelPlanner:
    def __init__(
        self,
        *,
        router: Router,
        redactor: Redactor,
        cache: PlanCache,
        max_steps: int = 10,
        prompts: Path = PROMPTS,
        on_cache_hit: Callable[[], None] = lambda: None,
        extra_tools: Mapping[str, Sequence[Tool]] | None = None,
    ) -> None:
        """`extra_tools`: per kind, tools offered besides the agent's own (declarative tools naming the kind)."""
        self._router = router
        self._redactor = redactor
        self._cache = cache
        self._max_steps = max_steps
        self._templates = {name: Template((prompts / f"{name}.md").read_text("utf-8")) for name in _PROMPTS}
        self._on_cache_hit = on_cache_hit
        self._extra = {kind: tuple(tools) for kind, tools in (extra_tools or {}).items()}
        self._failures: dict[ResourceKey, int] = {}
        self.on_planning: OnPlanning | None = None  # set by the daemon: writes phase Planning

    def offered(self, kind: str, tools: Sequence[Tool]) -> list[Tool]:
        """What a model planning `kind` is offered: the agent's `tools`, then the extra tools for `kind`."""
        own = {tool.name for tool in tools}
        return [*tools, *(tool for tool in self._extra.get(kind, ()) if tool.name not in own)]

    def route(
        self, snapshot: Snapshot, *, tools: Sequence[Tool], issue: Issue | None = None, hint: float | None = None,
        drift: Sequence[JsonValue] | None = None,
    ) -> tuple[Score, Tier]:  # fmt: skip
        """The complexity score of planning `snapshot` (with `issue`, if any) and the tier it routes to."""
        tools = self.offered(snapshot.key.kind, tools)
        diff = list(drift) if drift is not None else json_diff(snapshot.desired.spec, _state(snapshot))
        features = Features(
            changed_fields=len(diff),
            changed_resources=1,
            issue_severity=issue.severity if issue is not None else None,
            candidate_tools=len(tools),
            failed_attempts=self._failures.get(snapshot.key, 0),
            hint=hint,
        )
        total = score(features)
        return total, self._router.tier_for(total.total)

    async def heal(
        self, issue: Issue, snapshot: Snapshot, *, agent: str, tools: Sequence[Tool], rules_said: str,
        scope: Scope | None = None, drift: Sequence[JsonValue] | None = None, hint: float | None = None,
    ) -> ExecutionPlan:  # fmt: skip
        """A plan for `issue` that `agent`'s rules could not heal (`rules_said` is why), made with `tools`."""
        return await self._plan(
            snapshot, agent=agent, tools=tools, issue=issue, scope=scope, drift=drift, hint=hint,
            template="heal", fields={"rules_said": rules_said, "issue": _data(self._redactor.value(_issue(issue)))},
        )  # fmt: skip

    async def reconcile(
        self, snapshot: Snapshot, *, agent: str, tools: Sequence[Tool], task: str, hint: float | None = None,
        scope: Scope | None = None,
    ) -> ExecutionPlan:  # fmt: skip
        """A plan that moves `snapshot`'s resource to its desired state (`task` says what is asked)."""
        return await self._plan(
            snapshot, agent=agent, tools=tools, issue=None, scope=scope, drift=None, hint=hint, template="reconcile",
            fields={"task": task},
        )  # fmt: skip

    async def _plan(
        self, snapshot: Snapshot, *, agent: str, tools: Sequence[Tool], issue: Issue | None, scope: Scope | None,
        drift: Sequence[JsonValue] | None, hint: float | None, template: str, fields: dict[str, str],
    ) -> ExecutionPlan:  # fmt: skip
        scope = self._scope(snapshot, tools, scope)
        tools = self.offered(snapshot.key.kind, tools)
        catalogue = Catalogue(tools)
        diff = list(drift) if drift is not None else json_diff(snapshot.desired.spec, _state(snapshot))
        task = "\x00".join([template, fields.get("task", ""), "deleted" if snapshot.deleted else ""])
        key = cache_key(
            agent=agent, resource=str(snapshot.key), task=task, spec=snapshot.desired.spec, diff=diff, issue=issue,
            open_issues=snapshot.issues, catalogue=catalogue.version,
        )  # fmt: skip
        validate = self._validator(catalogue, scope)
        cached = self._from_cache(key, validate)
        if cached is not None:
            steps, reasoning, planner = cached
            return snapshot.plan(agent=agent, steps=steps, reasoning=reasoning, planner=planner)
        complexity, tier = self.route(snapshot, tools=tools, issue=issue, hint=hint, drift=diff)
        if self.on_planning is not None:
            await self.on_planning(snapshot, f"asking a {tier} language model for a plan (complexity "
                                             f"{complexity.total:.2f})")  # fmt: skip
        messages = self._messages(snapshot, template, fields, diff=diff, catalogue=catalogue)
        log.debug("llm.prompt", tier=tier.value, messages=[m.content for m in messages])  # redacted already
        try:
            solved = await self._router.solve(messages=messages, tool=SUBMIT_PLAN, tier=tier, validate=validate)
        except NoValidAnswer as e:
            self._failures[snapshot.key] = self._failures.get(snapshot.key, 0) + 1
            reason = f"no valid plan from a language model: {e}"
            self._cache.put(key, CachedPlan(failure=reason))
            raise PlanningFailed(reason) from None
        except (BudgetSpent, NoModelAnswered) as e:
            resumes = f"; planning resumes in {e.retry_after:.0f} s" if e.retry_after is not None else ""
            raise PlanningUnavailable(f"language-model planning is paused: {e}{resumes}", delay=e.retry_after) from None
        self._failures.pop(snapshot.key, None)
        steps, reasoning, arguments = solved.value
        log.info(
            "llm.planned", planner=solved.planner, steps=len(steps), tokens=solved.tokens,
            cost_usd=round(solved.cost_usd, 6), seconds=round(solved.seconds, 3),
        )  # fmt: skip
        self._cache.put(key, CachedPlan(arguments=arguments, planner=solved.planner))
        return snapshot.plan(agent=agent, steps=steps, reasoning=reasoning, planner=solved.planner)

    def _scope(self, snapshot: Snapshot, own: Sequence[Tool], scope: Scope | None) -> Scope | None:
        """The agent's scope for its own tools; for an extra tool, which the agent knows nothing of, the scope
        of a model-planned kind (`spec_scope`): a mutating step may target only what the desired spec names."""
        if not self._extra.get(snapshot.key.kind):
            return scope
        names = {tool.name for tool in own}
        extra = spec_scope(snapshot)

        def check(step: Step) -> str | None:
            if step.tool in names:
                return scope(step) if scope is not None else None
            return extra(step)

        return check

    def _from_cache(self, key: str, validate: _Validator) -> tuple[tuple[Step, ...], str, str] | None:
        """The cached answer for `key`, validated again (steps, reasoning, planner); PlanningFailed for a cached
        failure; None when there is none, or it no longer passes (the entry is then asked afresh)."""
        cached = self._cache.get(key)
        if cached is None:
            return None
        if cached.failure is not None:
            self._on_cache_hit()
            log.info("llm.plan_cache_hit", failed=True)
            raise PlanningFailed(cached.failure)
        assert cached.arguments is not None
        try:
            steps, reasoning, _ = validate(cached.arguments)
        except InvalidAnswer as e:
            log.info("llm.plan_cache_stale", reason=e.reason)
            return None
        self._on_cache_hit()
        log.info("llm.plan_cache_hit", planner=cached.planner, failed=False)
        return steps, reasoning, cached.planner

    def _messages(
        self, snapshot: Snapshot, template: str, fields: dict[str, str], *, diff: list[JsonValue],
        catalogue: Catalogue,
    ) -> tuple[ChatMessage, ...]:  # fmt: skip
        redact = self._redactor.value
        actual = snapshot.actual.state if snapshot.actual is not None else None
        common = {
            "resource": str(snapshot.key),
            "kind": snapshot.key.kind,
            "desired": _data(redact(snapshot.desired.model_dump(mode="json"))),
            "actual": _data(redact(actual) if actual is not None else "not observed yet"),
            "diff": _data(self._redact_diff(diff)),
            "open_issues": _data(redact([_issue(i) for i in snapshot.issues])),
            "tools": _data(catalogue.entries),
        }
        user = self._templates[template].substitute({**common, **fields})
        return (
            ChatMessage(role="system", content=self._templates["system"].substitute()),
            ChatMessage(role="user", content=user),
        )

    def _redact_diff(self, diff: list[JsonValue]) -> JsonValue:
        """The diff with both sides of an entry redacted when any key on its path is a secret one (a diff entry
        moves a value from under its own key to under `desired` / `actual`, where the key globs cannot see it)."""
        entries: list[JsonValue] = []
        for entry in diff:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                segments = str(entry["path"]).split("/")
                if any(self._redactor.secret_key(segment) for segment in segments if segment):
                    entry = {**entry, "desired": "[REDACTED]", "actual": "[REDACTED]"}
            entries.append(entry)
        return self._redactor.value(entries)

    def _validator(self, catalogue: Catalogue, scope: Scope | None) -> _Validator:
        def validate(arguments: dict[str, JsonValue]) -> tuple[tuple[Step, ...], str, dict[str, JsonValue]]:
            log.debug("llm.answer", arguments=self._redactor.value(arguments))
            try:
                answer = _SubmitPlan.model_validate(arguments)
            except ValidationError as e:
                detail = describe_validation_error(e, every=True)
                log.warning("llm.answer_rejected", reason="schema", why=self._redactor.text(detail)[:500])
                raise InvalidAnswer("schema", f"submit_plan's arguments do not match its schema: {detail}") from None
            if len(answer.steps) > self._max_steps:
                log.warning("llm.answer_rejected", reason="too_many_steps", steps=len(answer.steps))
                raise InvalidAnswer(
                    "too_many_steps", f"the plan has {len(answer.steps)} steps; at most {self._max_steps} are allowed"
                )
            try:
                steps = tuple(self._step(i, proposed, catalogue, scope) for i, proposed in enumerate(answer.steps, 1))
            except InvalidAnswer as e:  # what a model tried and was refused is worth an operator's eye
                log.warning("llm.answer_rejected", reason=e.reason, why=self._redactor.text(e.message)[:500])
                raise
            return steps, _cut(answer.reasoning, MAX_REASONING_CHARS), arguments

        return validate

    @staticmethod
    def _step(index: int, proposed: _ProposedStep, catalogue: Catalogue, scope: Scope | None) -> Step:
        tool = catalogue.get(proposed.tool)
        if tool is None:
            raise InvalidAnswer(
                "unknown_tool",
                f"step {index}: tool {_cut(proposed.tool, 60)!r} is not in the catalogue "
                f"(the tools are: {', '.join(catalogue.names) or 'none'})",
            )
        try:
            tool.parameters.model_validate(proposed.parameters, strict=True)
        except ValidationError as e:
            detail = describe_validation_error(e, what="parameter", whole="(parameters)", every=True)
            raise InvalidAnswer("parameters", f"step {index} ({tool.name}): {detail}") from None
        if proposed.risk < tool.risk:
            raise InvalidAnswer(
                "risk_understated",
                f"step {index} ({tool.name}) claims risk {proposed.risk}, lower than the tool's own risk {tool.risk}",
            )
        step = Step(
            tool=tool.name, parameters=proposed.parameters, description=_cut(proposed.description, 300) or tool.name,
            risk=proposed.risk,
        )  # fmt: skip
        why = scope(step) if scope is not None else None
        if why is not None:
            raise InvalidAnswer("out_of_scope", f"step {index} ({tool.name}): {why}")
        return step



class ModelAgent:
    """Plans a kind that no rule-based agent handles, with a model and the tools configured for the kind.

    Its `actual/` state is written by an observer outside setpoint (or by a
    tool). Actual matching desired on every field desired names is
    converged, and no model is asked; anything else is planned by the model.
    Until something has written `actual/`, nothing is planned (the resource
    is `Pending`, saying so): a plan made blind would run again at every
    resync. A mutating step may name as its target (`TARGET_PARAMETERS`)
    only a value the desired spec names, so nothing a model reads can point
    it at another file, unit or host.
    """

    name = "llm"

    def __init__(
        self, *, kind: str, tools: Sequence[Tool], planner: ModelPlanner | None, hint: float | None = None
    ) -> None:
        """`planner` None: a command that plans nothing (it only needs to know the kind)."""
        self.kinds = frozenset({kind})
        self._tools = tuple(tools)
        self._given = planner
        self._hint = hint

    @property
    def _planner(self) -> ModelPlanner:
        if self._given is None:
            raise PlanningUnavailable("this command has no language-model planner")
        return self._given

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools offered to the model for this kind (`llm.kinds.<kind>.tools`)."""
        return self._tools

    @property
    def hint(self) -> float | None:
        """This kind's own estimate of how hard it is to plan (`llm.kinds.<kind>.hint`)."""
        return self._hint

    def tools(self) -> Sequence[Tool]:
        return ()  # the tools belong to the agents that registered them; this one only offers them to a model

    async def reconcile(self, snapshot: Snapshot) -> ExecutionPlan:
        if snapshot.actual is None:
            raise PlanningUnavailable(
                f"waiting for the actual state: a kind planned by a model is planned once something writes "
                f"actual/{snapshot.key}", delay=WAIT_FOR_ACTUAL_SECONDS,
            )  # fmt: skip
        if not json_diff(snapshot.desired.spec, _state(snapshot)):
            return snapshot.plan(agent=self.name, reasoning="actual matches desired")
        return await self._planner.reconcile(
            snapshot, agent=self.name, tools=self._tools, hint=self._hint, scope=spec_scope(snapshot),
            task="Actual differs from desired: plan the steps that make them match.",
        )  # fmt: skip

    async def retire(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self._planner.reconcile(
            snapshot, agent=self.name, tools=self._tools, hint=self._hint,
            task="The desired resource was deleted (the desired state below is its last value): plan the removal of "
            "what it made, or no steps if nothing needs removing.", scope=spec_scope(snapshot),
        )  # fmt: skip

    async def heal(self, issue: Issue, snapshot: Snapshot) -> ExecutionPlan:
        return await self._planner.heal(
            issue, snapshot, agent=self.name, tools=self._tools, hint=self._hint, scope=spec_scope(snapshot),
            rules_said="no rule-based agent handles this kind.",
        )  # fmt: skip

    async def plan(self, snapshot: Snapshot) -> ExecutionPlan:
        return await self.reconcile(snapshot)


def spec_scope(snapshot: Snapshot) -> Scope:
    """A model-planned resource's scope: a mutating step's target parameters must be values its spec names."""
    named: set[str] = set()

    def collect(value: JsonValue) -> None:
        if isinstance(value, str):
            named.update({value, os.path.normpath(value)} if value.startswith("/") else {value})
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(snapshot.desired.spec)

    def check(step: Step) -> str | None:
        if step.risk is RiskLevel.READ_ONLY:
            return None
        for name in sorted(TARGET_PARAMETERS & set(step.parameters)):
            values = step.parameters[name]
            for value in values if isinstance(values, list) else [values]:
                known = isinstance(value, str) and (value in named or os.path.normpath(value) in named)
                if not known:
                    return f"parameter {name!r} may name only what the desired spec names, not {_cut(str(value), 80)!r}"
        return None

    return check


def _state(snapshot: Snapshot) -> dict[str, JsonValue] | None:
    return snapshot.actual.state if snapshot.actual is not None else None


def _issue(issue: Issue) -> dict[str, JsonValue]:
    return issue.model_dump(mode="json")


def _data(value: object) -> str:
    """`value` as JSON that cannot close its `<data>` block, cut to MAX_DATA_CHARS."""
    text = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, default=str).replace("<", "\\u003c")
    if len(text) > MAX_DATA_CHARS:
        text = text[:MAX_DATA_CHARS] + f"\n... [{len(text) - MAX_DATA_CHARS} more characters cut]"
    return text


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
