"""`approve`, `reject` and `replan`: a person's decision on a plan, through etcd (`decisions.py`)."""

from __future__ import annotations

import argparse

from plans import ApprovalDecision, PlanRecord
from reconciler.cli.common import CliError, os_user, resource_key, run, settings_of, store
from reconciler.decisions import decide, read_record
from reconciler.keys import KeySpace
from reconciler.status import parse_status


def _describe(record: PlanRecord) -> str:
    steps = "; ".join(step.description or step.tool for step in record.plan.steps)
    return f"{record.plan.resource}, risk {record.plan.risk}: {steps}"


def cmd_decide(args: argparse.Namespace) -> int:
    decision = ApprovalDecision(args.decision)
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    by = args.by or os_user()

    async def main() -> tuple[str, PlanRecord | None]:
        async with store(settings) as client:
            result = await decide(
                client, keys, args.plan_id, decision, by=by, reason=args.reason or "", source="cli",
                plan_hash=args.hash,
            )  # fmt: skip
            if result.refused is not None:
                raise CliError(result.message)
            return result.approval.plan_hash if result.approval else "", await read_record(client, keys, args.plan_id)

    plan_hash, record = run(main())
    what = {"approve": "approved", "reject": "rejected"}[decision.value]
    print(f"plan {args.plan_id} {what} by {by} (hash {plan_hash[:12]}…)")
    if record is not None:
        print(f"  {_describe(record)}")
    print("  the daemon takes the decision when it next looks at the resource; `setpoint plans show "
          f"{args.plan_id}` says whether it was accepted")  # fmt: skip
    return 0


def cmd_replan(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    key = resource_key(args.resource)
    by = args.by or os_user()

    async def main() -> str:
        async with store(settings) as client:
            kv = await client.get(keys.status(key))
            status = parse_status(kv.value) if kv is not None else None
            if status is None or status.plan_id is None:
                raise CliError(f"{key} has no plan to replan: it is not held by a rejected or expired plan")
            result = await decide(client, keys, status.plan_id, ApprovalDecision.REPLAN, by=by, source="cli")
            if result.refused is not None:
                raise CliError(f"{key} cannot be replanned: {result.message}")
            return status.plan_id

    plan_id = run(main())
    print(f"{key}: asked the daemon to drop plan {plan_id} and plan again")
    return 0
