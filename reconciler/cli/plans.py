"""`plan` (the dry run), and `plans list` / `plans show` (what was planned, decided and done).

`setpoint plan` builds the daemon's own parts (agents, tools, policies) and
runs each resource through the function the daemon uses from a snapshot to
a gated plan (`gate.plan_and_check`), then stops: it executes nothing and
writes nothing to etcd. The desired values come from etcd, or from a local
file (`-f`); the actual state from `actual/` in etcd, as the daemon last
observed it, or with `--observe` from the agents observing here and now
(on the daemon's own machine). Limits (flap guard, budget, max-unhealthy)
depend on what the daemon did recently, so a dry run reports the policy's
decision, not whether a limit would hold the plan back for a while.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agents import DiffingAgent, ObservingAgent
from plans import (
    InvalidResourceError,
    Observed,
    PlanningFailed,
    PlanningUnavailable,
    PlanRecord,
    PlanState,
    Resource,
    ResourceKey,
    Snapshot,
)
from policies.limits import FlapGuard, MutationBudget
from reconciler.assembly import Assembly, assemble
from reconciler.cache import Cache, DesiredEntry
from reconciler.cli.common import CliError, age, print_table, resource_key, run, settings_of, shorten, store
from reconciler.cli.resources import validate
from reconciler.clock import SystemClock
from reconciler.documents import load_resources
from reconciler.gate import Check, Gate, plan_and_check
from reconciler.keys import KeySpace, Section
from reconciler.metrics import Metrics
from reconciler.observer import Observer
from reconciler.settings import Settings
from reconciler.store import EtcdStore
from reconciler.watch import list_all

_CHANGE = {
    Check.RUN: "will run",
    Check.EMPTY: "no changes",
    Check.NEEDS_APPROVAL: "needs approval",
    Check.DENIED: "denied",
    Check.INVALID_PLAN: "error",
    Check.TOO_LARGE: "error",
    Check.SHADOW: "shadow",
}


@dataclass
class Row:
    key: ResourceKey
    change: str
    message: str = ""
    risk: str = "-"
    decision: str = "-"
    rule: str = ""
    steps: list[dict[str, str]] = field(default_factory=list)
    diff: str = ""

    @property
    def error(self) -> bool:
        return self.change == "error"

    @property
    def changes(self) -> bool:
        return self.change not in ("no changes", "error")

    def as_json(self) -> dict[str, Any]:
        return {
            "resource": str(self.key), "kind": self.key.kind, "name": self.key.name, "change": self.change,
            "risk": self.risk, "decision": self.decision, "rule": self.rule, "message": self.message,
            "steps": self.steps, "diff": self.diff,
        }  # fmt: skip


def cmd_plan(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    parts = assemble(settings)
    wanted = [resource_key(text) for text in args.resources]
    local = load_resources(args.file) if args.file else None
    if local is not None:
        validate(local, parts.agents, "standard input" if args.file == "-" else args.file)
    rows = run(_plan(settings, parts, wanted, local, observe=args.observe))
    if args.output == "json":
        print(json.dumps([row.as_json() for row in rows], indent=2))
    else:
        _print(rows)
    if any(row.error for row in rows):
        return 1
    return 2 if args.detailed_exitcode and any(row.changes for row in rows) else 0


async def _plan(
    settings: Settings, parts: Assembly, wanted: list[ResourceKey], local: list[Resource] | None, *, observe: bool
) -> list[Row]:
    keys = KeySpace(settings.etcd.prefix)
    cache = Cache(keys)
    async with store(settings) as client:
        await _load(client, keys, cache, local)
        observer = Observer(store=client, keys=keys, cache=cache, agents=parts.agents, poll_seconds={})
        limits = parts.policies.limits
        clock = SystemClock()
        gate = Gate(
            tools=parts.tools, policies=parts.policies, observer=observer, cache=cache, metrics=Metrics(),
            flap=FlapGuard(max_plans=limits.flap_max_plans, window=limits.flap_window_seconds, now=clock.now),
            budget=MutationBudget(per_minute=limits.max_mutating_steps_per_minute, now=clock.now, sleep=clock.sleep),
        )  # fmt: skip
        entries = sorted(cache.desired.values(), key=lambda e: (e.key.kind, e.key.name))
        if wanted:
            missing = [str(key) for key in wanted if key not in cache.desired]
            if missing:
                raise CliError(f"no desired value for {', '.join(missing)}")
            entries = [e for e in entries if e.key in set(wanted)]
        return [await _row(entry, parts, gate, cache, observe=observe) for entry in entries]


async def _load(client: EtcdStore, keys: KeySpace, cache: Cache, local: list[Resource] | None) -> None:
    """Fill `cache` as the daemon's watch does (tombstones included), with `local` in place of desired/."""
    kvs, statuses, revision = await list_all(client, keys)
    cache.relist(kvs, statuses, revision)
    if local is not None:
        live = {key: entry.mod_revision for key, entry in cache.desired.items() if not entry.deleted}
        cache.desired = {r.key: DesiredEntry(r.key, live.get(r.key, revision), r) for r in local}


async def _row(entry: DesiredEntry, parts: Assembly, gate: Gate, cache: Cache, *, observe: bool) -> Row:
    key = entry.key
    if entry.resource is None or entry.error is not None:
        return Row(key, "error", entry.error or "value could not be read")
    agent = parts.agents.for_kind(key.kind)
    if agent is None:
        return Row(key, "error", f"no agent handles kind {key.kind!r}")
    try:
        actual = await _actual(entry.resource, agent, cache, observe=observe)
        snapshot = Snapshot(desired=entry.resource, revision=entry.mod_revision, deleted=entry.deleted, actual=actual)
        verdict = await plan_and_check(agent, gate, snapshot, heals_drift=False)
        diff = await agent.diff(snapshot) if isinstance(agent, DiffingAgent) and verdict.plan.steps else ""
    except (InvalidResourceError, PlanningFailed, PlanningUnavailable) as e:  # a model's planning too: this row only
        return Row(key, "error", str(e))
    plan = verdict.plan
    row = Row(
        key, _CHANGE.get(verdict.check, "will run"), verdict.message or plan.reasoning, diff=diff,
        steps=[{"tool": s.tool, "description": s.description, "risk": s.risk.value} for s in plan.steps],
    )  # fmt: skip
    if verdict.decision is not None:
        row.risk, row.decision, row.rule = plan.risk.value, verdict.decision.action.value, verdict.decision.rule
    return row


async def _actual(resource: Resource, agent: object, cache: Cache, *, observe: bool) -> Observed | None:
    if observe and isinstance(agent, ObservingAgent):
        state = await agent.observe(resource)
        return Observed(kind=resource.kind, name=resource.name, state=state, observed_at=datetime.now(UTC))
    entry = cache.actual.get(resource.key)
    return entry.observed if entry is not None else None


def _print(rows: list[Row]) -> None:
    table = [
        [str(r.key), r.change, r.risk, f"{r.decision} ({r.rule})" if r.rule else "-",
         shorten("; ".join(s["description"] for s in r.steps) or r.message, 120)]
        for r in rows
    ]  # fmt: skip
    print_table(("RESOURCE", "CHANGE", "RISK", "DECISION", "STEPS"), table)
    for row in rows:
        if row.diff:
            print(f"\n--- {row.key}\n{row.diff}")
        elif row.error:
            print(f"\n--- {row.key}: {row.message}")
    changed = sum(r.changes for r in rows)
    approval = sum(r.change == "needs approval" for r in rows)
    denied = sum(r.change == "denied" for r in rows)
    errors = sum(r.error for r in rows)
    print(f"\n{changed} to change ({approval} need approval, {denied} denied), "
          f"{len(rows) - changed - errors} unchanged, {errors} errors; nothing was executed or written")  # fmt: skip


# -- plans list / show ----------------------------------------------------------------


async def _records(settings: Settings) -> list[tuple[PlanRecord | None, str]]:
    keys = KeySpace(settings.etcd.prefix)
    async with store(settings) as client:
        kvs, _ = await client.get_prefix(keys.section(Section.PLANS))
    records: list[tuple[PlanRecord | None, str]] = []
    for kv in kvs:
        plan_id = kv.key.decode("utf-8", "replace").rsplit("/", 1)[-1]
        try:
            records.append((PlanRecord.model_validate_json(kv.value), plan_id))
        except ValueError:
            records.append((None, plan_id))
    return records


def _state(text: str) -> PlanState:
    normal = text.lower().replace("-", "_")
    for state in PlanState:
        if normal in (state.value, state.value.replace("_", "")):
            return state
    raise CliError(f"{text!r} is not a plan state (one of {', '.join(s.value for s in PlanState)})")


def cmd_plans_list(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    wanted = resource_key(args.resource) if args.resource else None
    state = _state(args.phase) if args.phase else None
    records = run(_records(settings))
    if args.shadow:
        return _shadow_list([r for r, _ in records if r is not None], wanted, json_output=args.output == "json")
    rows = []
    listed: list[dict[str, object]] = []
    for record, plan_id in records:
        if record is None:
            rows.append([plan_id, "?", "?", "-", "-", "-", "plan record cannot be read"])
            listed.append({"id": plan_id, "error": "plan record cannot be read"})
            continue
        if (wanted is not None and record.plan.resource != wanted) or (state is not None and record.state is not state):
            continue
        listed.append({
            "id": plan_id, "resource": str(record.plan.resource), "kind": record.plan.resource.kind,
            "name": record.plan.resource.name, "state": record.state.value, "risk": record.plan.risk.value,
            "decision": record.decision, "rule": record.decision_rule, "created_at": record.created_at.isoformat(),
            "message": record.message,
        })  # fmt: skip
        steps = "; ".join(s.description or s.tool for s in record.plan.steps)
        rows.append([
            plan_id, str(record.plan.resource), record.state.value, record.plan.risk.value,
            f"{record.decision} ({record.decision_rule})" if record.decision_rule else record.decision,
            age(record.created_at), shorten(record.message or steps, 100),
        ])  # fmt: skip
    if args.output == "json":
        print(json.dumps(listed, indent=2))
        return 0
    print_table(("ID", "RESOURCE", "STATE", "RISK", "DECISION", "AGE", "SUMMARY"), rows)
    return 0


def _then(shadow: PlanRecord, records: list[PlanRecord]) -> PlanRecord | None:
    """The first plan that ran (or was put to a person) for `shadow`'s resource after it was recorded."""
    later = [
        r for r in records
        if r.plan.resource == shadow.plan.resource and r.state is not PlanState.SHADOW
        and r.created_at >= shadow.created_at
    ]  # fmt: skip
    return min(later, key=lambda r: r.created_at, default=None)


def _shadow_list(records: list[PlanRecord], wanted: ResourceKey | None, *, json_output: bool) -> int:
    """Each shadow plan, what it would have done, and what then ran for the same resource (if anything)."""
    shadows = sorted(
        (r for r in records if r.state is PlanState.SHADOW and (wanted is None or r.plan.resource == wanted)),
        key=lambda r: r.created_at,
    )
    rows, listed = [], []
    for record in shadows:
        then = _then(record, records)
        would = [step.model_dump(mode="json", include={"tool", "parameters"}) for step in record.plan.steps]
        same = then is not None and would == [
            step.model_dump(mode="json", include={"tool", "parameters"}) for step in then.plan.steps
        ]
        listed.append({
            "id": record.plan.id, "resource": str(record.plan.resource), "planner": record.plan.planner,
            "risk": record.plan.risk.value, "decision_reason": record.decision_reason,
            "created_at": record.created_at.isoformat(), "steps": [s.description or s.tool for s in record.plan.steps],
            "then": None if then is None else {
                "id": then.plan.id, "state": then.state.value, "planner": then.plan.planner, "same_steps": same,
                "steps": [s.description or s.tool for s in then.plan.steps],
            },
        })  # fmt: skip
        ran = "nothing ran since" if then is None else (
            f"{then.plan.id} {then.state.value} ({then.plan.planner}): "
            + ("the same steps" if same else "; ".join(s.description or s.tool for s in then.plan.steps))
        )  # fmt: skip
        rows.append([
            record.plan.id, str(record.plan.resource), record.plan.risk.value, age(record.created_at),
            shorten("; ".join(s.description or s.tool for s in record.plan.steps), 60), shorten(ran, 70),
        ])  # fmt: skip
    if json_output:
        print(json.dumps(listed, indent=2))
    else:
        print_table(("ID", "RESOURCE", "RISK", "AGE", "WOULD HAVE RUN", "THEN"), rows)
    return 0


def cmd_plans_show(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)

    async def main() -> PlanRecord | None:
        from reconciler.decisions import read_record

        async with store(settings) as client:
            return await read_record(client, keys, args.plan_id)

    record = run(main())
    if record is None:
        raise CliError(f"no plan {args.plan_id!r} (or its record cannot be read); `setpoint plans list` shows them")
    if args.output == "json":
        print(record.model_dump_json(indent=2))
        return 0
    plan = record.plan
    lines = [
        f"plan       {plan.id}",
        f"resource   {plan.resource}{' (teardown)' if record.retiring else ''}",
        f"state      {record.state.value}" + (f": {record.message}" if record.message else ""),
        f"risk       {plan.risk.value}",
        f"planner    {plan.planner} (agent {plan.agent}), for desired revision {plan.desired_revision}",
        f"decision   {record.decision} by {record.decision_rule or '?'}: {record.decision_reason}",
        f"hash       {record.plan_hash}",
        f"created    {record.created_at.isoformat()} ({age(record.created_at)} ago)",
    ]
    if record.approvers:
        lines.append(f"approvers  {', '.join(record.approvers)}")
    if record.expires_at is not None and record.state is PlanState.AWAITING_APPROVAL:
        lines.append(f"expires    {record.expires_at.isoformat()}")
    if record.approval is not None:
        a = record.approval
        lines.append(f"approval   {a.decision} by {a.by} via {a.source or '?'} at {a.at.isoformat()}"
                     + (f": {a.reason}" if a.reason else ""))  # fmt: skip
    for note in record.refusals:
        lines.append(f"refused    {note.decision} by {note.by} at {note.at.isoformat()}: {note.refused}")
    if record.verification:
        lines.append(f"verify     {record.verification}")
    lines.append(f"rollback   {record.rollback.value} (if a step fails after others succeeded)")
    lines.append(f"reasoning  {plan.reasoning}")
    lines.append("steps")
    for step, journal in zip(plan.steps, record.steps, strict=False):
        lines.append(
            f"  {journal.index + 1}. [{journal.state.value}] {step.tool} ({step.risk.value}): {step.description}"
        )
        if journal.message:
            lines.append(f"       {journal.message}")
        if journal.undo_note:
            lines.append(f"       cannot be undone: {journal.undo_note}")
    if record.rolled_back:
        lines.append("rolled back")
        for undo in record.rolled_back:
            lines.append(f"  undo step {undo.undoes + 1}: [{undo.state.value}] {undo.tool}: {undo.step.description}")
            if undo.message:
                lines.append(f"       {undo.message}")
    if record.state is PlanState.AWAITING_APPROVAL:
        lines.append(f"\napprove: setpoint approve {plan.id}    reject: setpoint reject {plan.id} --reason TEXT")
    print("\n".join(lines))
    return 0
