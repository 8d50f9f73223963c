"""`llm route` (which tier a resource's planning goes to, and why) and `llm eval` (the evaluation cases).

`setpoint llm route KIND/NAME` builds the daemon's parts, reads the
resource's desired value, actual state and open issues from etcd, and shows
what the model would be asked now (`reconciler/evals.py:question`: drift
first, then the oldest open issue), with each complexity feature, its value
and its points, the total, the thresholds, the tier and that tier's models.
It calls no model. Earlier failed planning counts only within one process,
so here `failed_attempts` is always 0: the running daemon adds its own.

`setpoint llm eval` runs the cases in `tests/evals` (or `--cases DIR`)
through the real planner against the recorded answers, or with `--live`
against the configured models, and prints per case and run what came back
and what it cost; routed against always-large in total. Exit 0 when every
case passes, 1 otherwise. Nothing is executed and etcd is not touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import structlog

from llm_router import Tier
from llm_router.complexity import tier_for
from plans import InvalidResourceError, ResourceKey, Snapshot
from reconciler.assembly import assemble
from reconciler.cache import Cache, IssueEntry
from reconciler.cli.common import CliError, print_table, resource_key, run, settings_of, shorten, store
from reconciler.evals import (
    CaseResult,
    Question,
    Report,
    Run,
    live_router,
    load_cases,
    question,
    replay_router,
    run_evals,
)
from reconciler.keys import KeySpace
from reconciler.logs import configure_logging
from reconciler.settings import Settings
from reconciler.watch import list_all

NO_MODELS = "no language model is configured: llm.tiers is empty"


# -- llm route --------------------------------------------------------------------------------------------------


def cmd_llm_route(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = resource_key(args.resource)
    parts = assemble(settings)
    if parts.planner is None:
        raise CliError(NO_MODELS)
    agent = parts.agents.for_kind(key.kind)
    if agent is None:
        raise CliError(f"no agent handles kind {key.kind!r} (a kind a model plans is named in llm.kinds)")
    snapshot, issues = run(_snapshot(settings, key))
    try:
        asked = run(question(agent, snapshot))
    except InvalidResourceError as e:
        raise CliError(f"{key}: {e}") from None
    if isinstance(asked, str):
        if args.output == "json":
            print(json.dumps({"resource": str(key), "model_asked": False, "reason": asked}, indent=2))
        else:
            print(f"{key}: {asked}")
        return 0
    asked = dataclasses.replace(asked, tools=tuple(parts.planner.offered(key.kind, asked.tools)))
    score, tier = parts.planner.route(snapshot, tools=asked.tools, issue=asked.issue, hint=asked.hint,
                                      drift=asked.drift)  # fmt: skip
    routing = settings.llm.routing
    scored = tier_for(score.total, routing)
    issue = issues[0] if asked.issue is not None and issues else None
    result = {
        "resource": str(key), "model_asked": True, "task": asked.task,
        "issue": {"id": issue.id, "summary": issue.issue.summary, "severity": issue.issue.severity} if issue else None,
        "tools": [tool.name for tool in asked.tools],
        "features": [c.model_dump(mode="json") for c in score.contributions], "total": score.total,
        "thresholds": {"standard_at": routing.standard_at, "large_at": routing.large_at},
        "scored_tier": scored.value, "tier": tier.value,
        "models": [model.label for model in settings.llm.tiers.models(tier)],
    }  # fmt: skip
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        _print_route(key, asked, issue, result, scored=scored, tier=tier)
    return 0


async def _snapshot(settings: Settings, key: ResourceKey) -> tuple[Snapshot, list[IssueEntry]]:
    """`key`'s desired value, actual state and open issues (oldest first), read as `setpoint plan` reads them."""
    keys = KeySpace(settings.etcd.prefix)
    cache = Cache(keys)
    async with store(settings) as client:
        kvs, statuses, revision = await list_all(client, keys)
    cache.relist(kvs, statuses, revision)
    entry = cache.desired.get(key)
    if entry is None:
        raise CliError(f"no desired value for {key} (`setpoint apply` writes one)")
    if entry.resource is None or entry.error is not None:
        raise CliError(f"{key}: {entry.error or 'its desired value could not be read'}")
    actual = cache.actual.get(key)
    issues = cache.open_issues(key) if not entry.deleted else []
    snapshot = Snapshot(
        desired=entry.resource, revision=entry.mod_revision, deleted=entry.deleted,
        actual=actual.observed if actual is not None else None, issues=tuple(i.issue for i in issues),
    )  # fmt: skip
    return snapshot, issues


def _print_route(
    key: ResourceKey, asked: Question, issue: IssueEntry | None, result: dict[str, object], *, scored: Tier, tier: Tier
) -> None:
    what = {"heal": "heal", "reconcile": "reconcile (actual differs from desired)", "retire": "retire (deleted)"}
    about = f" of issue {issue.id} ({issue.issue.severity}): {shorten(issue.issue.summary, 80)}" if issue else ""
    print(f"{key}: {what[asked.task]}{about}")
    print(f"tools offered: {', '.join(t.name for t in asked.tools) or 'none'}\n")
    features = result["features"]
    assert isinstance(features, list)
    rows = [[f["feature"], "-" if f["value"] is None else str(f["value"]), f"{f['points']:.2f}"] for f in features]
    rows.append(["total", "", f"{result['total']:.2f}"])
    print_table(("FEATURE", "VALUE", "POINTS"), rows)
    thresholds = result["thresholds"]
    assert isinstance(thresholds, dict)
    print(f"\nthresholds: standard from {thresholds['standard_at']:.2f}, large from {thresholds['large_at']:.2f}")
    moved = f" (the score says {scored.value}, which has no model)" if scored is not tier else ""
    models = result["models"]
    assert isinstance(models, list)
    print(f"tier: {tier.value}{moved}; models, in order: {', '.join(models)}")
    print("failed_attempts counts failures in this process only; the daemon adds 0.15 for each of its own.")
    print("No model was called.")


# -- llm eval ---------------------------------------------------------------------------------------------------


def cmd_llm_eval(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    llm = settings.llm
    tier = Tier(args.tier) if args.tier else None
    if args.live:
        if not llm.tiers.configured:
            raise CliError(NO_MODELS)
        for needed in dict.fromkeys((tier or Tier.LARGE, Tier.LARGE)):
            if not llm.tiers.models(needed):
                raise CliError(f"--live runs tier {needed.value}, but llm.tiers.{needed.value} names no model")
    cases = load_cases(Path(args.cases), recordings=not args.live)
    routers = live_router(llm) if args.live else replay_router(llm)
    with _quiet_logs():
        results = run(run_evals(cases, routers=routers, max_steps=llm.max_steps, tier=tier))
    report = Report(live=args.live, tier=tier, results=results)
    if args.output == "json":
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_eval(report)
    return 0 if report.passed == len(report.results) else 1


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Only errors, on stderr, while the cases run: the planner's events, the rejections the table reports
    included, would mix into it. The set-up before is restored after, for a program (or a test) that runs this
    command in-process."""
    saved = structlog.get_config()
    configure_logging("error")
    try:
        yield
    finally:
        structlog.configure(**saved)


def _row(result: CaseResult, run_: Run, *, first: bool) -> list[str]:
    expect = result.case.spec.expect
    steps = len(run_.tools)
    valid = f"yes ({steps} step{'s' if steps != 1 else ''})" if run_.valid else f"no ({run_.outcome})"
    used = run_.expected_used(expect)
    failures = run_.failures(expect)
    name = result.case.name + (" (hostile)" if result.case.spec.hostile else "") if first else ""
    return [
        name, run_.mode, run_.tier, run_.planner or "-", valid, "-" if used is None else "yes" if used else "no",
        str(run_.tokens), f"${run_.cost_usd:.6f}", f"{run_.seconds:.1f}s", "FAIL" if failures else "pass",
        ", ".join(run_.forbidden_proposed(expect)) or "-", _rejections(run_) or "-",
    ]  # fmt: skip


def _rejections(run_: Run) -> str:
    """Each model's rejected answers' reasons, a repeated reason counted: `recorded/small: unknown_tool x2`."""
    said: list[tuple[str, str, int]] = []
    for call in run_.calls:
        if call.rejection is None:
            continue
        if said and said[-1][:2] == (call.model, call.rejection):
            said[-1] = (call.model, call.rejection, said[-1][2] + 1)
        else:
            said.append((call.model, call.rejection, 1))
    return ", ".join(f"{model}: {reason}" + (f" x{count}" if count > 1 else "") for model, reason, count in said)


def _print_eval(report: Report) -> None:
    rows = []
    for result in report.results:
        rows += [_row(result, result.first, first=True), _row(result, result.large, first=False)]
    headers = ("CASE", "RUN", "TIER", "ANSWERED BY", "VALID PLAN", "EXPECTED TOOLS", "TOKENS", "COST", "LATENCY",
               "RESULT", "FORBIDDEN PROPOSED", "REJECTIONS")  # fmt: skip
    print_table(headers, rows)
    failed = [(r, run_) for r in report.results for run_ in (r.first, r.large) if run_.failures(r.case.spec.expect)]
    for result, run_ in failed:
        print(f"\n{result.case.name} ({run_.mode}) fails: {'; '.join(run_.failures(result.case.spec.expect))}")
    first = report.results[0].first.mode if report.results else "routed"
    print(
        f"\n{report.passed}/{len(report.results)} cases pass ({first}); always-large: "
        f"{report.large_passed}/{len(report.results)} pass"
    )
    saving = report.saving
    said = "" if saving is None else f": {saving:.1%} {'saved' if saving >= 0 else 'more'}"
    differs = report.validity_differs
    validity = (
        "at equal validity (a runnable plan from both runs or from neither, in every case)" if not differs
        else f"but validity differs on {', '.join(differs)}"
    )  # fmt: skip
    print(f"cost: {first} ${report.cost_usd:.6f} against always-large ${report.large_cost_usd:.6f}{said}, {validity}")
    source = "the configured models were asked" if report.live else "replayed from the recorded answers"
    print(f"{source}; nothing was executed")
