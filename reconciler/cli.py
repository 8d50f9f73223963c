"""The `setpoint` command line.

Errors are one sentence on stderr and exit code 1; `--debug` adds the
traceback. Commands other than `run` find etcd through `etcd.endpoints` in
the settings, or else through the endpoint file a daemon running the
embedded default leaves in its state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from plans import ResourceKey
from reconciler.documents import DocumentError, load_resources
from reconciler.embedded import read_endpoint_file
from reconciler.errors import StartupError
from reconciler.keys import KeySpace, Section
from reconciler.settings import Settings, SettingsError, load_settings
from reconciler.store import MAX_REQUEST_BYTES, MAX_TXN_OPS, EtcdStore, StoreError, StoreUnavailableError


class CliError(Exception):
    pass


def _endpoints(settings: Settings) -> list[str]:
    if settings.etcd.endpoints:
        return list(settings.etcd.endpoints)
    state_dir = settings.resolved_state_dir()
    endpoint = read_endpoint_file(state_dir)
    if endpoint is None:
        raise CliError(
            f"no etcd to talk to: set etcd.endpoints in the settings, or start `setpoint run` "
            f"(embedded etcd) with state directory {state_dir}"
        )
    return [endpoint]


def _store(settings: Settings) -> EtcdStore:
    return EtcdStore(
        _endpoints(settings),
        timeout=settings.etcd.request_timeout_seconds,
        retry_attempts=settings.etcd.retry_attempts,
    )


# -- run ------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler.daemon import Daemon
    from reconciler.logs import configure_logging

    configure_logging(settings.log.level)

    async def main() -> int:
        stop = asyncio.Event()
        daemon = Daemon(settings)

        def on_signal(sig: signal.Signals) -> None:
            daemon.stop_signal = daemon.stop_signal or sig.name
            stop.set()

        loop = asyncio.get_running_loop()
        # SIGHUP drains like SIGTERM until setpoint can reload its settings.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
        return await daemon.run(stop)

    return asyncio.run(main())


# -- apply ----------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    resources = load_resources(Path(args.file))
    keys = KeySpace(settings.etcd.prefix)
    items = [
        (keys.desired(r.key), json.dumps(r.model_dump(mode="json"), sort_keys=True).encode()) for r in resources
    ]

    for index, (key, value) in enumerate(items, start=1):
        if len(key) + len(value) > MAX_REQUEST_BYTES - 1024:
            raise CliError(
                f"{args.file} document {index}: {len(value)} bytes is more than etcd accepts in one request "
                f"({MAX_REQUEST_BYTES} bytes)"
            )

    async def main() -> None:
        async with _store(settings) as store:
            for batch in _batches(items):
                await store.put_all(batch)

    asyncio.run(main())
    for r in resources:
        print(f"{r.key} applied")
    return 0


def _batches(items: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Split writes into transactions etcd accepts: at most MAX_TXN_OPS each and under its request size."""
    batches: list[list[tuple[str, bytes]]] = [[]]
    size = 0
    budget = MAX_REQUEST_BYTES - 64 * 1024  # headroom for the transaction's own framing
    for key, value in items:
        item_size = len(key) + len(value) + 64
        if batches[-1] and (len(batches[-1]) >= MAX_TXN_OPS or size + item_size > budget):
            batches.append([])
            size = 0
        batches[-1].append((key, value))
        size += item_size
    return batches


# -- status ---------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    keys = KeySpace(settings.etcd.prefix)
    wanted = ResourceKey.parse(args.resource) if args.resource else None

    async def main() -> list[dict[str, object]]:
        async with _store(settings) as store:
            if wanted is not None:
                kv = await store.get(keys.status(wanted))
                kvs = [kv] if kv is not None else []
            else:
                kvs, _ = await store.get_prefix(keys.section(Section.STATUS))
        rows = []
        for kv in kvs:
            parsed = keys.parse(kv.key)
            if parsed is None or parsed.resource is None:
                continue
            try:
                value = json.loads(kv.value)
            except ValueError:
                value = {"phase": "?", "message": "status value is not valid JSON"}
            if not isinstance(value, dict):
                value = {"phase": "?", "message": "status value is not a JSON object"}
            rows.append({"resource": str(parsed.resource), **value})
        return rows

    rows = asyncio.run(main())
    if wanted is not None and not rows:
        raise CliError(f"no status for {wanted}: it has not been reconciled, or does not exist")
    if args.output == "json":
        print(json.dumps(rows if wanted is None else rows[0], indent=2, sort_keys=True))
    else:
        _print_table(rows)
    return 0


def _print_table(rows: list[dict[str, object]]) -> None:
    header = ("RESOURCE", "PHASE", "REVISION", "PLAN", "MESSAGE")
    table = [header] + [
        (
            str(r.get("resource", "")),
            str(r.get("phase", "")),
            str(r.get("observed_revision", "")),
            str(r.get("plan_id") or "-"),
            str(r.get("message", ""))[:100],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


# -- entry point ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setpoint", description="Keep infrastructure at its desired state.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="settings file (YAML); defaults apply when omitted")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon"))
    run.set_defaults(func=cmd_run)
    apply = with_config(sub.add_parser("apply", help="write desired resources from a YAML or JSON file"))
    apply.add_argument("-f", "--file", required=True, help="file of resources (YAML or JSON)")
    apply.set_defaults(func=cmd_apply)
    status = with_config(sub.add_parser("status", help="show resource phases"))
    status.add_argument("resource", nargs="?", help="KIND/NAME; all resources when omitted")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        code: int = args.func(args, settings)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return code
    except BrokenPipeError:
        # The reader stopped reading (`setpoint status | head -1`): end quietly, as a
        # process ended by SIGPIPE would, and keep the exit from flushing into the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CliError, SettingsError, DocumentError, StartupError, StoreError, StoreUnavailableError,
            ValueError) as e:  # fmt: skip
        if args.debug:
            traceback.print_exc()
        print(f"setpoint: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
