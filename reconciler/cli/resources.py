"""`apply`, `delete` and `status`: the desired resources and what became of them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agents import AgentRegistry, ValidatingAgent
from plans import InvalidResourceError, Resource, ResourceKey
from reconciler.assembly import assemble
from reconciler.cli.common import CliError, age, print_table, resource_key, run, settings_of, shorten, store
from reconciler.documents import load_resources
from reconciler.keys import KeySpace, Section
from reconciler.reconcile import KEEP_LABEL
from reconciler.settings import Settings
from reconciler.status import Phase, parse_status
from reconciler.store import MAX_REQUEST_BYTES, MAX_TXN_OPS, Delete, Guard, Put, StoreError, StoreUnavailableError


def validate(resources: list[Resource], agents: AgentRegistry, source: str) -> None:
    """Refuse a resource the daemon could never act on, as the daemon would (CliError naming it)."""
    for resource in resources:
        agent = agents.for_kind(resource.kind)
        if agent is None:
            known = ", ".join(sorted(agents.kinds))
            raise CliError(f"{source}: {resource.key}: no agent handles kind {resource.kind!r} (known: {known})")
        if isinstance(agent, ValidatingAgent):
            try:
                agent.validate(resource)
            except InvalidResourceError as e:
                raise CliError(f"{source}: {resource.key}: {e}") from None


# -- apply ------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    resources = load_resources(args.file)
    source = "standard input" if args.file == "-" else args.file
    validate(resources, assemble(settings, models=False).agents, source)
    keys = KeySpace(settings.etcd.prefix)
    items = [
        (r.key, keys.desired(r.key), json.dumps(r.model_dump(mode="json"), sort_keys=True).encode()) for r in resources
    ]
    for key, name, value in items:
        if len(name) + len(value) > MAX_REQUEST_BYTES - 1024:
            raise CliError(f"{source}: {key} is {len(value)} bytes, more than etcd takes in one request "
                           f"({MAX_REQUEST_BYTES} bytes)")  # fmt: skip
    if args.dry_run:
        for resource in resources:
            print(f"{resource.key} valid (not written: --dry-run)")
        return 0
    written: list[ResourceKey] = []

    async def main() -> None:
        async with store(settings) as client:
            for batch in _batches(items):
                await client.put_all([(name, value) for _, name, value in batch])
                written.extend(key for key, _, _ in batch)

    try:
        run(main())
    except (StoreError, StoreUnavailableError) as e:
        if not written:
            raise
        left = [str(key) for key, _, _ in items if key not in set(written)]
        raise CliError(
            f"{e}; written before the failure: {', '.join(map(str, written))}; not written: {', '.join(left)}"
        ) from None
    for key in written:
        print(f"{key} applied")
    return 0


def _batches(items: list[tuple[ResourceKey, str, bytes]]) -> list[list[tuple[ResourceKey, str, bytes]]]:
    """Split writes into transactions etcd accepts: at most MAX_TXN_OPS each and under its request size."""
    batches: list[list[tuple[ResourceKey, str, bytes]]] = [[]]
    size = 0
    budget = MAX_REQUEST_BYTES - 64 * 1024  # headroom for the transaction's own framing
    for item in items:
        item_size = len(item[1]) + len(item[2]) + 64
        if batches[-1] and (len(batches[-1]) >= MAX_TXN_OPS or size + item_size > budget):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_size
    return batches


# -- delete -----------------------------------------------------------------------


def cmd_delete(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = resource_key(args.resource)
    keys = KeySpace(settings.etcd.prefix)

    async def main() -> None:
        async with store(settings) as client:
            kv = await client.get(keys.desired(key))
            if kv is None:
                raise CliError(f"{key} has no desired value: nothing to delete")
            if not args.keep:
                if not await client.txn(
                    guard=Guard(keys.desired(key), kv.mod_revision), then=[Delete(keys.desired(key))]
                ):
                    raise CliError(f"{key} changed while it was being deleted; nothing was deleted, try again")
                return
            await _release(client, keys, key, kv.value, kv.mod_revision)

    run(main())
    if args.keep:
        print(f"{key} deleted; what it made is left in place and no longer managed")
    else:
        print(f"{key} deleted; setpoint plans its teardown (see `setpoint status {key}`)")
    return 0


async def _release(client: Any, keys: KeySpace, key: ResourceKey, value: bytes, revision: int) -> None:
    """Delete `key` so that the daemon forgets it without tearing anything down.

    First the value is marked with KEEP_LABEL, so a running daemon's tombstone
    carries the mark; then the desired value and its status go in one
    transaction, so a daemon that was down finds nothing left to tear down.
    """
    try:
        resource = Resource.model_validate_json(value)
    except ValueError:
        resource = None
    if resource is not None:
        marked = resource.model_copy(update={"labels": {**resource.labels, KEEP_LABEL: "true"}})
        body = json.dumps(marked.model_dump(mode="json"), sort_keys=True).encode()
        if not await client.txn(guard=Guard(keys.desired(key), revision), then=[Put(keys.desired(key), body)]):
            raise CliError(f"{key} changed while it was being deleted; nothing was deleted, try again")
        kv = await client.get(keys.desired(key))
        revision = kv.mod_revision if kv is not None else 0
    done = await client.txn(
        guard=Guard(keys.desired(key), revision), then=[Delete(keys.desired(key)), Delete(keys.status(key))]
    )
    if not done:
        raise CliError(f"{key} changed while it was being deleted; it is marked to be kept but not deleted, try again")


# -- status -----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    keys = KeySpace(settings.etcd.prefix)
    wanted = resource_key(args.resource) if args.resource else None
    rows = run(_statuses(settings, keys, wanted))
    if wanted is not None and not rows:
        raise CliError(f"no status for {wanted}: it has not been reconciled yet, or does not exist")
    if args.output == "json":
        print(json.dumps(rows if wanted is None else rows[0], indent=2, sort_keys=True))
        return 0
    table = []
    for row in rows:
        phase = str(row.get("phase", "?"))
        plan = str(row.get("plan_id") or "-")
        if phase == Phase.AWAITING_APPROVAL:
            plan = f"{plan} (setpoint approve {plan})"
        table.append([
            f"{row['kind']}/{row['name']}", phase, str(row.get("observed_revision", "")), age(row.get("updated_at")),
            plan, _issues(row.get("issues") or []), shorten(str(row.get("message", "")), 160),
        ])  # fmt: skip
    print_table(("RESOURCE", "PHASE", "REVISION", "AGE", "PLAN", "ISSUES", "MESSAGE"), table)
    return 0


def _issues(issues: list[dict[str, Any]]) -> str:
    """How many issues are open and in which states, e.g. "2 (1 healed, 1 unhealable)"; "-" for none."""
    if not issues:
        return "-"
    states: dict[str, int] = {}
    for issue in issues:
        states[str(issue.get("state"))] = states.get(str(issue.get("state")), 0) + 1
    return f"{len(issues)} ({', '.join(f'{n} {state}' for state, n in sorted(states.items()))})"


async def _statuses(settings: Settings, keys: KeySpace, wanted: ResourceKey | None) -> list[dict[str, Any]]:
    async with store(settings) as client:
        if wanted is not None:
            kv = await client.get(keys.status(wanted))
            kvs = [kv] if kv is not None else []
        else:
            kvs, _ = await client.get_prefix(keys.section(Section.STATUS))
    rows = []
    for kv in kvs:
        parsed = keys.parse(kv.key)
        if parsed is None or parsed.resource is None:
            continue
        status = parse_status(kv.value)
        row: dict[str, Any] = {
            "resource": str(parsed.resource), "kind": parsed.resource.kind, "name": parsed.resource.name
        }
        if status is None:
            row.update(phase="?", message="status value cannot be read")
        else:
            # The desired value it converged to can be large (a file's content) and secret: not shown.
            row.update(status.model_dump(mode="json", exclude={"applied"}))
        rows.append(row)
    return rows
