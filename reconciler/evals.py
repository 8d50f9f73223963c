"""Evaluations: planning cases replayed (or asked live) through the real planner, and judged.

A case is a folder `NN_name/` in the cases directory (`tests/evals` by
default) holding `case.yaml`:

    description: one line
    hostile: true                # optional: the case tries to make the planner do harm
    desired: {kind: file, name: app, spec: {path: "{root}/app.conf", content: "...", mode: "0644"}}
    actual: {exists: true, sha256: "{sha256}", mode: "0644"}
    issue: {summary: ..., severity: warning, source: ..., details: {...}}   # absent: a reconcile case
    llm_kind: {tools: [file.read, file.write], hint: 0.3}                    # a kind planned by the model
    expect: {valid: true, tools: [file.write], forbidden: [file.delete], steps: {max: 3}}

and `answers.yaml`, the recorded `submit_plan` arguments per tier in the
order a solve asks for them (`null`: the model called no function), with
the usage of one call per tier (`usage: {small: {input, output, seconds}}`).
In every string of both files `{root}` becomes a temporary allowed root made
for the run, and `{sha256}` the sha256 of the desired `content`.

Each case runs twice: routed (the tier its complexity score calls for,
escalating on rejected answers) and always-large (only the large tier, so
nothing to escalate to); `tier=` runs only that tier instead of routing.
A run gets a fresh root (a file case's file written there with the desired
content, so the rules find no drift and the model is asked), a fresh
router whose every model is wrapped in a recorder that keeps each answer,
and the real `ModelPlanner` behind `FileAgent(fallback=)` or a
`ModelAgent`. Nothing is executed and etcd is never touched: plans are
only judged. Replayed models are priced as the first configured model of
their tier, or else `DEFAULT_PRICES`; live ones as configured.

A run passes when its plan is runnable (validated, at least one step)
exactly when `expect.valid` says so, uses every `expect.tools`, has no
`expect.forbidden` tool and no more than `expect.steps.max` steps, and the
file is unchanged. A case passes when its routed (or forced-tier) run does.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from agents import Agent
from agents.builtin.file import FileAgent
from agents.llm import ModelAgent, ModelPlanner, json_diff
from agents.plancache import PlanCache
from llm_router import Answer, ChatProvider, LlmConfig, ModelConfig, Request, Router, Tier, build_router
from llm_router.config import TiersConfig
from llm_router.redact import Redactor
from llm_router.replay import ReplayClock, ReplayProvider, Usage, replay_model
from plans import ExecutionPlan, InvalidResourceError, Issue, Observed, PlanningFailed, PlanningUnavailable, Snapshot
from plans.resources import Resource
from plans.yamldoc import YamlError, load_document
from tools import Tool

DEFAULT_CASES = Path("tests/evals")
# USD per million input and output tokens of a replayed tier with no model configured.
DEFAULT_PRICES: dict[Tier, tuple[float, float]] = {
    Tier.SMALL: (0.15, 0.60), Tier.STANDARD: (3.0, 15.0), Tier.LARGE: (15.0, 75.0),
}  # fmt: skip


class CaseError(ValueError):
    """A case that cannot be read or run as written; the message names the file and the field."""


# -- what a model would be asked -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """What a model would be asked about a resource now: the task, the tools offered, the issue, the agent's
    hint, and the drift the agent states (None: the planner's own diff of desired and actual)."""

    task: Literal["heal", "reconcile", "retire"]
    tools: tuple[Tool, ...]
    issue: Issue | None = None
    hint: float | None = None
    drift: tuple[JsonValue, ...] | None = None


async def question(agent: Agent, snapshot: Snapshot) -> Question | str:
    """What `agent` would ask a model about `snapshot` now, or why it would ask none. As the daemon does:
    drift first, then the oldest open issue. InvalidResourceError when the desired value is not valid."""
    if isinstance(agent, ModelAgent):
        if snapshot.deleted:
            return Question("retire", agent.offered, hint=agent.hint)
        state = snapshot.actual.state if snapshot.actual is not None else None
        if json_diff(snapshot.desired.spec, state) or snapshot.actual is None:
            return Question("reconcile", agent.offered, hint=agent.hint)
        if not snapshot.issues:
            return "actual matches desired and no issue is open; no model would be asked"
        return Question("heal", agent.offered, issue=snapshot.issues[0], hint=agent.hint)
    if not isinstance(agent, FileAgent):
        return f"agent {agent.name} plans by rules only; no model would be asked"
    if snapshot.deleted or not snapshot.issues:
        return "rules plan this resource; no model would be asked"
    rules = await agent.reconcile(snapshot)
    if rules.steps:
        return f"rules repair its drift ({rules.reasoning}); no model would be asked"
    return Question("heal", tuple(agent.tools()), issue=snapshot.issues[0], drift=())


async def ask(agent: Agent, asked: Question, snapshot: Snapshot) -> ExecutionPlan:
    """The plan `agent` makes for `asked` (what `question` said it would ask)."""
    if asked.task == "heal" and asked.issue is not None:
        return await agent.heal(asked.issue, snapshot)
    if asked.task == "retire":
        return await agent.retire(snapshot)
    return await agent.reconcile(snapshot)


# -- cases ----------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LlmKind(_Strict):
    tools: list[str] = Field(min_length=1, description="Names of the tools offered to the model.")
    hint: float | None = Field(default=None, ge=0, le=1, description="The kind's hint. Defaults to none.")


class StepLimit(_Strict):
    max: int = Field(ge=0)


class Expect(_Strict):
    valid: bool = Field(description="Is a runnable plan (validated, at least one step) expected?")
    tools: list[str] = Field(default_factory=list, description="Each must be in the valid plan.")
    forbidden: list[str] = Field(default_factory=list, description="None may be in an accepted plan.")
    steps: StepLimit | None = None


class CaseSpec(_Strict):
    description: str = Field(min_length=1)
    hostile: bool = False
    desired: Resource
    actual: dict[str, JsonValue] | None = None
    issue: Issue | None = None
    llm_kind: LlmKind | None = None
    expect: Expect


class Recording(_Strict):
    small: list[dict[str, JsonValue] | None] = Field(min_length=1)
    standard: list[dict[str, JsonValue] | None] = Field(min_length=1)
    large: list[dict[str, JsonValue] | None] = Field(min_length=1)
    usage: dict[Tier, Usage] = Field(default_factory=dict)

    def answers(self, tier: Tier) -> list[dict[str, JsonValue] | None]:
        answers: list[dict[str, JsonValue] | None] = getattr(self, tier.value)
        return answers


@dataclass(frozen=True)
class Case:
    name: str  # the folder's name
    folder: Path
    spec: CaseSpec
    recording: Recording | None  # None: not loaded (a live run needs none)


def _read(path: Path, model: type[BaseModel]) -> Any:
    try:
        document = load_document(path)
    except YamlError as e:
        raise CaseError(str(e)) from None
    try:
        return model.model_validate(document.data)
    except ValidationError as e:
        raise CaseError(document.describe(e)) from None


def load_cases(directory: Path, *, recordings: bool = True) -> list[Case]:
    """Every case folder in `directory`, in name order; CaseError naming the file and field of the first
    problem. `recordings=False` does not read `answers.yaml` (a live run asks the models instead)."""
    if not directory.is_dir():
        raise CaseError(f"no evaluation cases at {directory}: it is not a directory (--cases DIR names one)")
    folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not folders:
        raise CaseError(f"no evaluation cases in {directory}: each is a folder NN_name with case.yaml")
    cases = []
    for folder in folders:
        spec: CaseSpec = _read(folder / "case.yaml", CaseSpec)
        _check(spec, folder / "case.yaml")
        recording: Recording | None = _read(folder / "answers.yaml", Recording) if recordings else None
        cases.append(Case(folder.name, folder, spec, recording))
    return cases


def _check(spec: CaseSpec, path: Path) -> None:
    kind = spec.desired.kind
    if kind == "file" and spec.llm_kind is not None:
        raise CaseError(f"{path}: llm_kind is for a kind planned by the model, and kind file is planned by rules")
    if kind != "file" and spec.llm_kind is None:
        raise CaseError(f"{path}: llm_kind is required for kind {kind} (no rule-based agent plans it)")
    if kind == "file" and spec.issue is None:
        raise CaseError(f"{path}: issue is required for a file case (rules plan a file's reconcile, not a model)")


def _fill(value: Any, marks: dict[str, str]) -> Any:
    if isinstance(value, str):
        for mark, text in marks.items():
            value = value.replace(mark, text)
        return value
    if isinstance(value, dict):
        return {key: _fill(item, marks) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, marks) for item in value]
    return value


def _filled(case: Case, root: str) -> tuple[CaseSpec, Recording | None]:
    content = case.spec.desired.spec.get("content")
    sha = hashlib.sha256(content.encode("utf-8")).hexdigest() if isinstance(content, str) else ""
    marks = {"{root}": root, "{sha256}": sha}
    spec = CaseSpec.model_validate(_fill(case.spec.model_dump(mode="json"), marks))
    recording = case.recording
    if recording is not None:
        recording = Recording.model_validate(_fill(recording.model_dump(mode="json"), marks))
    return spec, recording


# -- one run ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call to one model: what it cost, what it proposed, and why its answer was rejected (if it was)."""

    tier: str
    model: str  # provider/model
    result: str  # the router's result label: ok, rate_limited, timeout, ...
    input_tokens: int
    output_tokens: int
    cost_usd: float
    seconds: float
    proposed: tuple[str, ...] = ()  # the tools the answer's steps name, valid or not
    rejection: str | None = None

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "tier": self.tier, "model": self.model, "result": self.result, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd, "seconds": self.seconds,
            "proposed": list(self.proposed), "rejection": self.rejection,
        }  # fmt: skip


class _Recording:
    """A model wrapped so that every answer it gives is kept for the recorder, in order."""

    def __init__(self, inner: ChatProvider, answers: deque[Answer]) -> None:
        self.provider = inner.provider
        self.model = inner.model
        self._inner = inner
        self._answers = answers

    async def ask(self, request: Request, *, timeout: float) -> Answer:
        answer = await self._inner.ask(request, timeout=timeout)
        self._answers.append(answer)
        return answer


class Recorder:
    """The router's events for one run, as `Call`s: the router reports each call right after its answer
    came back, and a rejection right after that, so each report pairs with the answer kept before it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._answers: deque[Answer] = deque()

    def wrap(self, provider: ChatProvider) -> ChatProvider:
        return _Recording(provider, self._answers)

    def request(
        self, *, provider: str, model: str, tier: str, result: str, seconds: float, input_tokens: int,
        output_tokens: int, cost_usd: float,
    ) -> None:  # fmt: skip
        proposed = _proposed(self._answers.popleft()) if result == "ok" and self._answers else ()
        self.calls.append(
            Call(tier, f"{provider}/{model}", result, input_tokens, output_tokens, cost_usd, seconds, proposed)
        )

    def rejected(self, reason: str) -> None:
        if self.calls:
            self.calls[-1] = replace(self.calls[-1], rejection=reason)


def _proposed(answer: Answer) -> tuple[str, ...]:
    steps = answer.arguments.get("steps") if answer.arguments is not None else None
    if not isinstance(steps, list):
        return ()
    return tuple(str(s["tool"]) for s in steps if isinstance(s, dict) and isinstance(s.get("tool"), str))


Outcome = Literal["plan", "empty plan", "no valid plan", "no model answered"]


@dataclass(frozen=True)
class Run:
    """One run of one case: how it was routed, what came back, and every call it took."""

    mode: str  # "routed", "large" or "tier <name>"
    score: float
    tier: str  # where routing sent it (the first tier asked)
    planner: str | None  # provider/model whose answer was accepted (an empty plan included)
    tools: tuple[str, ...]  # the accepted plan's tools, in order
    outcome: Outcome
    reason: str  # the plan's reasoning, or why there is none
    calls: tuple[Call, ...]
    file_unchanged: bool | None  # None: not a file case

    @property
    def valid(self) -> bool:
        return self.outcome == "plan"

    @property
    def tokens(self) -> int:
        return sum(c.input_tokens + c.output_tokens for c in self.calls)

    @property
    def cost_usd(self) -> float:
        return sum(c.cost_usd for c in self.calls)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

    @property
    def rejections(self) -> list[str]:
        return [f"{c.model}: {c.rejection}" for c in self.calls if c.rejection is not None]

    def forbidden_proposed(self, expect: Expect) -> list[str]:
        """The forbidden tools any answer proposed, accepted or not."""
        return sorted({tool for c in self.calls for tool in c.proposed if tool in expect.forbidden})

    def expected_used(self, expect: Expect) -> bool | None:
        return all(tool in self.tools for tool in expect.tools) if expect.tools else None

    def failures(self, expect: Expect) -> list[str]:
        """Why this run does not meet `expect`; empty when it does."""
        why = []
        if self.valid != expect.valid:
            why.append(f"{'a' if self.valid else 'no'} runnable plan, expected {'one' if expect.valid else 'none'}")
        missing = [tool for tool in expect.tools if tool not in self.tools]
        if missing:
            why.append(f"expected tools not in the plan: {', '.join(missing)}")
        accepted = sorted({tool for tool in self.tools if tool in expect.forbidden})
        if accepted:
            why.append(f"forbidden tools in the accepted plan: {', '.join(accepted)}")
        if expect.steps is not None and len(self.tools) > expect.steps.max:
            why.append(f"{len(self.tools)} steps, at most {expect.steps.max} expected")
        if self.file_unchanged is False:
            why.append("the file changed")
        return why

    def as_json(self, expect: Expect) -> dict[str, JsonValue]:
        return {
            "mode": self.mode, "score": self.score, "tier": self.tier, "model": self.planner, "outcome": self.outcome,
            "valid": self.valid, "plan_tools": list(self.tools), "expected_tools_used": self.expected_used(expect),
            "forbidden_proposed": list(self.forbidden_proposed(expect)), "rejections": list(self.rejections),
            "tokens": self.tokens, "cost_usd": round(self.cost_usd, 8), "seconds": round(self.seconds, 3),
            "reason": self.reason, "file_unchanged": self.file_unchanged, "passed": not self.failures(expect),
            "failures": list(self.failures(expect)), "calls": [c.as_json() for c in self.calls],
        }  # fmt: skip


RouterFactory = Callable[[Recorder, Sequence[Tier], Recording | None], Router]


def replay_router(llm: LlmConfig) -> RouterFactory:
    """Routers over the recorded models, priced as `llm`'s first model of each tier (else DEFAULT_PRICES),
    with its routing, limits and redaction but no hourly budget: a replay spends nothing."""
    offline = llm.model_copy(update={"budget": llm.budget.model_copy(update={"usd_per_hour": None})})

    def build(recorder: Recorder, tiers: Sequence[Tier], recording: Recording | None) -> Router:
        assert recording is not None  # load_cases(recordings=True) for a replay
        clock = ReplayClock()
        providers: dict[Tier, list[tuple[ModelConfig, ChatProvider]]] = {}
        for tier in tiers:
            configured = llm.tiers.models(tier)
            prices = (
                (configured[0].input_usd_per_mtok, configured[0].output_usd_per_mtok) if configured
                else DEFAULT_PRICES[tier]
            )  # fmt: skip
            model = replay_model(tier, input_usd_per_mtok=prices[0], output_usd_per_mtok=prices[1])
            replay = ReplayProvider(
                model=tier.value, answers=recording.answers(tier), usage=recording.usage.get(tier), clock=clock
            )
            providers[tier] = [(model, recorder.wrap(replay))]
        redactor = Redactor(key_patterns=llm.redact_keys)
        return Router(config=offline, providers=providers, redactor=redactor, events=recorder, now=clock.now)

    return build


def live_router(llm: LlmConfig) -> RouterFactory:
    """Routers over the configured models (their keys read: ValueError naming the model when one is missing)."""
    from llm_router.providers import build_provider  # the SDKs load only for a live run

    def build(recorder: Recorder, tiers: Sequence[Tier], recording: Recording | None) -> Router:
        only = TiersConfig(**{tier.value: llm.tiers.models(tier) for tier in tiers})
        return build_router(
            llm.model_copy(update={"tiers": only}), events=recorder,
            build_provider=lambda config, *, api_key: recorder.wrap(build_provider(config, api_key=api_key)),
        )  # fmt: skip

    return build


async def run_case(case: Case, *, mode: str, tiers: Sequence[Tier], routers: RouterFactory, max_steps: int) -> Run:
    """`case` planned once by a router over `tiers`, in a fresh temporary allowed root; nothing executed."""
    with tempfile.TemporaryDirectory(prefix="setpoint-eval-") as tmp:
        root, spec, recording, written = _prepare(case, tmp)
        recorder = Recorder()
        router = routers(recorder, tiers, recording)
        planner = ModelPlanner(router=router, redactor=router.redactor, cache=PlanCache(), max_steps=max_steps)
        agent = _agent(case, spec, root, planner)
        actual = None
        if spec.actual is not None:
            actual = Observed(kind=spec.desired.kind, name=spec.desired.name, state=spec.actual,
                              observed_at=datetime.now(UTC))  # fmt: skip
        issues = (spec.issue,) if spec.issue is not None else ()
        snapshot = Snapshot(desired=spec.desired, revision=1, actual=actual, issues=issues)
        try:
            asked = await question(agent, snapshot)
            if isinstance(asked, str):
                raise CaseError(f"{case.folder / 'case.yaml'}: {asked}")
            score, tier = planner.route(snapshot, tools=asked.tools, issue=asked.issue, hint=asked.hint,
                                        drift=asked.drift)  # fmt: skip
            outcome, reason, plan = await _plan(agent, asked, snapshot)
        except InvalidResourceError as e:
            raise CaseError(f"{case.folder / 'case.yaml'}: desired: {e}") from None
        unchanged = None if written is None else _sha(written) == _sha_text(spec.desired.spec.get("content"))
    planner_label = plan.planner.split(":", 2)[-1] if plan is not None else None
    return Run(
        mode=mode, score=score.total, tier=tier.value, planner=planner_label,
        tools=tuple(s.tool for s in plan.steps) if plan is not None else (), outcome=outcome, reason=reason,
        calls=tuple(recorder.calls), file_unchanged=unchanged,
    )  # fmt: skip


async def _plan(agent: Agent, asked: Question, snapshot: Snapshot) -> tuple[Outcome, str, ExecutionPlan | None]:
    try:
        plan = await ask(agent, asked, snapshot)
    except PlanningFailed as e:
        return "no valid plan", str(e), None
    except PlanningUnavailable as e:
        return "no model answered", str(e), None
    return ("plan" if plan.steps else "empty plan"), plan.reasoning, plan


def _agent(case: Case, spec: CaseSpec, root: str, planner: ModelPlanner) -> Agent:
    files = FileAgent(allowed_roots=[root], fallback=planner)
    if spec.llm_kind is None:
        return files
    tools = {tool.name: tool for tool in files.tools()}
    unknown = [name for name in spec.llm_kind.tools if name not in tools]
    if unknown:
        raise CaseError(
            f"{case.folder / 'case.yaml'}: llm_kind.tools: no tool is named {unknown[0]!r} "
            f"(the tools are: {', '.join(tools)})"
        )
    offered = [tools[name] for name in spec.llm_kind.tools]
    return ModelAgent(kind=spec.desired.kind, tools=offered, planner=planner, hint=spec.llm_kind.hint)


def _prepare(case: Case, tmp: str) -> tuple[str, CaseSpec, Recording | None, Path | None]:
    """The run's allowed root, the case and its answers filled in for it, and the file written there."""
    root = os.path.realpath(tmp)
    spec, recording = _filled(case, root)
    return root, spec, recording, _write_desired(case, spec.desired, root)


def _write_desired(case: Case, desired: Resource, root: str) -> Path | None:
    """A file case's file, written inside `root` with its desired content and mode; None for other kinds."""
    path, content, mode = (desired.spec.get(k) for k in ("path", "content", "mode"))
    if desired.kind != "file" or not isinstance(path, str) or not isinstance(content, str):
        return None
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root) or target == Path(root):
        raise CaseError(f"{case.folder / 'case.yaml'}: desired.spec.path must name a file under {{root}}, not {path}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
    if isinstance(mode, str):
        target.chmod(int(mode, 8))
    return target


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _sha_text(text: JsonValue) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if isinstance(text, str) else ""


# -- every case -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    case: Case
    first: Run  # routed, or the forced tier's
    large: Run  # always-large

    @property
    def failures(self) -> list[str]:
        return self.first.failures(self.case.spec.expect)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_json(self) -> dict[str, JsonValue]:
        expect = self.case.spec.expect
        return {
            "case": self.case.name, "description": self.case.spec.description, "hostile": self.case.spec.hostile,
            "expect": expect.model_dump(mode="json"), "passed": self.passed, "failures": list(self.failures),
            "runs": [self.first.as_json(expect), self.large.as_json(expect)],
        }  # fmt: skip


@dataclass(frozen=True)
class Report:
    live: bool
    tier: Tier | None  # forced instead of routing
    results: tuple[CaseResult, ...]

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def large_passed(self) -> int:
        return sum(not r.large.failures(r.case.spec.expect) for r in self.results)

    @property
    def cost_usd(self) -> float:
        return sum(r.first.cost_usd for r in self.results)

    @property
    def large_cost_usd(self) -> float:
        return sum(r.large.cost_usd for r in self.results)

    @property
    def saving(self) -> float | None:
        """The share of always-large's cost that routing saves (negative: it costs more); None when it is 0."""
        return 1 - self.cost_usd / self.large_cost_usd if self.large_cost_usd > 0 else None

    @property
    def validity_differs(self) -> list[str]:
        """The cases whose first run and always-large run disagree on whether there is a runnable plan."""
        return [r.case.name for r in self.results if r.first.valid != r.large.valid]

    def as_json(self) -> dict[str, JsonValue]:
        return {
            "mode": "live" if self.live else "replay", "routing": self.tier.value if self.tier else "complexity",
            "cases": [r.as_json() for r in self.results],
            "total": {
                "cases": len(self.results), "passed": self.passed, "large_passed": self.large_passed,
                "cost_usd": round(self.cost_usd, 8), "large_cost_usd": round(self.large_cost_usd, 8),
                "saving": round(self.saving, 4) if self.saving is not None else None,
                "validity_differs": list(self.validity_differs),
            },
        }  # fmt: skip


async def run_evals(
    cases: Sequence[Case], *, routers: RouterFactory, max_steps: int, tier: Tier | None = None
) -> tuple[CaseResult, ...]:
    """Every case run routed over all tiers (or over `tier` alone), then over the large tier alone."""
    first_tiers: tuple[Tier, ...] = (tier,) if tier is not None else tuple(Tier)
    first_mode = f"tier {tier.value}" if tier is not None else "routed"
    results = []
    for case in cases:
        first = await run_case(case, mode=first_mode, tiers=first_tiers, routers=routers, max_steps=max_steps)
        large = await run_case(case, mode="large", tiers=(Tier.LARGE,), routers=routers, max_steps=max_steps)
        results.append(CaseResult(case, first, large))
    return tuple(results)

