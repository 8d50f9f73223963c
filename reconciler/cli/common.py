"""What every command shares: finding the settings, talking to etcd, reading KIND/NAME, printing tables.

Settings are found like kubeconfig: `-c FILE`, else `$SETPOINT_CONFIG`, else
`./setpoint.yaml`, else `/etc/setpoint/config.yaml`, else the defaults.
Commands other than `run` find etcd through `etcd.endpoints`, or else
through the endpoint file a daemon running the embedded default leaves in
its state directory. They wait for etcd a few seconds at most, never the
daemon's retry loop, and say which endpoint did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from plans import ResourceKey
from reconciler.connect import CredentialsError, open_store
from reconciler.embedded import read_endpoint_file
from reconciler.settings import Settings, load_settings
from reconciler.store import EtcdStore

T = TypeVar("T")

CONFIG_SEARCH = (Path("setpoint.yaml"), Path("/etc/setpoint/config.yaml"))
CLI_TIMEOUT_SECONDS = 5.0


class CliError(Exception):
    """A one-sentence reason the command failed; exit code 1."""


def find_config(given: str | None) -> Path | None:
    """The settings file to use: `given`, else $SETPOINT_CONFIG, else the first of CONFIG_SEARCH that exists."""
    if given:
        return Path(given)
    env = os.environ.get("SETPOINT_CONFIG")
    if env:
        return Path(env)
    return next((path for path in CONFIG_SEARCH if path.is_file()), None)


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(find_config(args.config))


def endpoints(settings: Settings) -> list[str]:
    if settings.etcd.endpoints:
        return list(settings.etcd.endpoints)
    state_dir = settings.resolved_state_dir()
    endpoint = read_endpoint_file(state_dir)
    if endpoint is None:
        raise CliError(
            f"no etcd to talk to: no daemon with the embedded etcd is running for state directory {state_dir}, "
            f"and etcd.endpoints is not set (settings: -c FILE, $SETPOINT_CONFIG, ./setpoint.yaml or "
            f"/etc/setpoint/config.yaml)"
        )
    return [endpoint]


def store(settings: Settings) -> EtcdStore:
    """A client for short commands: one attempt per request, a few seconds each."""
    timeout = min(settings.etcd.request_timeout_seconds, CLI_TIMEOUT_SECONDS)
    try:
        return open_store(settings.etcd, endpoints(settings), timeout=timeout, retry_attempts=1)
    except CredentialsError as e:
        raise CliError(str(e)) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; Ctrl-C cancels it at once and exits 130."""
    return asyncio.run(coro)


def resource_key(text: str) -> ResourceKey:
    """`KIND/NAME`, or a one-sentence CliError saying what is wrong with `text`."""
    kind, sep, name = text.partition("/")
    if not sep or not kind or not name or "/" in name:
        raise CliError(f"{text!r} is not KIND/NAME (for example file/motd)")
    try:
        return ResourceKey(kind=kind, name=name)
    except ValueError:
        raise CliError(
            f"{text!r} is not KIND/NAME: kind and name are lowercase letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit, at most 63 characters"
        ) from None


def age(when: datetime | str | None, now: datetime | None = None) -> str:
    """A short age such as 5s, 3m, 2h, 4d; "-" when unknown."""
    if not isinstance(when, str | datetime):  # None, or a value from etcd of another type
        return "-"
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def shorten(text: str, width: int) -> str:
    """`text` on one line, cut at a word boundary with an ellipsis when longer than `width`."""
    text = " ".join(text.split())
    return textwrap.shorten(text, width=width, placeholder=" …") if len(text) > width else text


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, wrap_last: bool = True) -> None:
    """A table: drawn with rich on a terminal, plain aligned columns otherwise (for grep, awk and pipes)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for index, header in enumerate(headers):
            last = index == len(headers) - 1
            table.add_column(header, overflow="fold" if last and wrap_last else "ellipsis", no_wrap=not last)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max([len(header)] + [len(row[i]) for row in rows]) for i, header in enumerate(headers[:-1])]
    for row in [list(headers), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())


def os_user() -> str:
    """Who runs this command, for `--by`."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or "unknown"
