"""`issues list`, `issues report` and `issues resolve`: the issues reported on resources, by hand or by probes.

`list` shows each open issue with what the daemon did about it, as the
resource's status says (`open` until the daemon has looked at that report).
`report` writes a new issue (its id is made up unless `--id` is given, and
an existing issue is never overwritten); `resolve` deletes one. The daemon
does the rest: it heals a new report once, under the same policies as any
plan.
"""

from __future__ import annotations

import argparse
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from plans import NAME_PATTERN, Issue, ResourceKey
from reconciler.assembly import assemble
from reconciler.cache import parse_issue
from reconciler.cli.common import CliError, age, os_user, print_table, resource_key, run, settings_of, shorten, store
from reconciler.keys import KeySpace, Section
from reconciler.status import parse_status
from reconciler.store import EtcdStore, Guard, Put, range_end


def cmd_issues_list(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    wanted = resource_key(args.resource) if args.resource else None
    listed = run(_list(keys, store(settings), wanted))
    if args.output == "json":
        print(json.dumps(listed, indent=2, sort_keys=True))
        return 0
    rows = []
    for item in listed:
        state = str(item["state"])
        if item.get("plan_id"):
            state += f" ({item['plan_id']})"
        detail = str(item.get("summary") or "")
        if item.get("message"):
            detail += f" ({item['message']})"
        rows.append([
            str(item["resource"]), str(item["id"]), str(item.get("severity", "?")), state, str(item.get("source", "?")),
            age(item.get("reported_at")), shorten(str(detail), 120),
        ])  # fmt: skip
    print_table(("RESOURCE", "ID", "SEVERITY", "STATE", "SOURCE", "AGE", "SUMMARY"), rows)
    return 0


async def _list(keys: KeySpace, client: EtcdStore, wanted: ResourceKey | None) -> list[dict[str, Any]]:
    async with client:
        if wanted is not None:
            kvs, _ = await client.get_prefix(keys.issues(wanted))
            found = await client.get(keys.status(wanted))
            statuses = [found] if found is not None else []
        else:
            kvs, revision = await client.get_prefix(keys.section(Section.ISSUES))
            start = keys.section(Section.STATUS).encode()
            statuses, _ = await client.range(start, range_end(start), revision=revision)
    said: dict[tuple[ResourceKey, str], dict[str, Any]] = {}
    for kv in statuses:
        parsed = keys.parse(kv.key)
        status = parse_status(kv.value)
        if parsed is None or parsed.resource is None or status is None:
            continue
        for issue in status.issues:
            said[(parsed.resource, issue.id)] = issue.model_dump(mode="json")
    listed = []
    for kv in sorted(kvs, key=lambda kv: kv.mod_revision):  # oldest report first, as the daemon heals them
        parsed = keys.parse(kv.key)
        if parsed is None or parsed.resource is None or not parsed.issue_id:
            continue
        key, issue_id = parsed.resource, parsed.issue_id
        item: dict[str, Any] = {"resource": str(key), "kind": key.kind, "name": key.name, "id": issue_id}
        entry, error = parse_issue(key, issue_id, kv)
        if entry is None:
            item.update(state="invalid", message=f"ignored by the daemon: {error}")
            listed.append(item)
            continue
        details = entry.issue.details
        item.update(entry.issue.model_dump(mode="json", exclude={"details"}), details=details, report=entry.report)
        item["reported_at"] = details.get("reported_at") or details.get("starts_at")
        done = said.get((key, issue_id))
        if done is not None and done["report"] == entry.report:
            item.update(state=done["state"], plan_id=done["plan_id"], message=done["message"])
        else:
            item.update(state="open", plan_id=None, message="")
        listed.append(item)
    return listed


def cmd_issues_report(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    key = resource_key(args.resource)
    kinds = assemble(settings, models=False).agents.kinds
    if key.kind not in kinds:
        raise CliError(f"no agent handles kind {key.kind!r} (known: {', '.join(sorted(kinds))}): nothing would heal it")
    now = datetime.now(UTC)
    issue_id = args.id or f"cli-{now:%Y%m%dt%H%M%S}-{secrets.token_hex(3)}"
    if NAME_PATTERN.fullmatch(issue_id) is None:
        raise CliError(f"--id {issue_id!r} must match {NAME_PATTERN.pattern}")
    if not args.summary.strip():
        raise CliError("--summary must say what is wrong")
    user = os_user()
    issue = Issue(
        summary=args.summary, severity=args.severity, source=args.source or f"cli/{user}",
        details={"reported_by": user, "reported_at": now.isoformat()},
    )  # fmt: skip
    path = keys.issue(key, issue_id)
    value = json.dumps(issue.model_dump(mode="json"), separators=(",", ":")).encode()

    async def main() -> tuple[bool, bool]:
        async with store(settings) as client:
            written = await client.txn(guard=Guard(path, 0), then=[Put(path, value)])
            desired = await client.get(keys.desired(key)) is not None
            return written, desired

    written, desired = run(main())
    if not written:
        raise CliError(f"issue {issue_id} already exists on {key}; resolve it first or choose another --id")
    print(f"reported issue {issue_id} on {key}")
    if not desired:
        print(f"note: {key} has no desired value, so nothing heals this issue until it has one")
    return 0


def cmd_issues_resolve(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    key = resource_key(args.resource)
    if not args.id or "/" in args.id:  # any other id is taken, so that a key written by hand can be removed
        raise CliError(f"{args.id!r} is not an issue id: an id is one key segment, with no '/'")

    async def main() -> bool:
        async with store(settings) as client:
            return await client.delete(keys.issue(key, args.id))

    if not run(main()):
        raise CliError(f"no issue {args.id} on {key}; `setpoint issues list {key}` shows them")
    print(f"resolved issue {args.id} on {key}")
    return 0
