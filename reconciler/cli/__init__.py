"""The `setpoint` command line: one module per command group, and the one place errors become exit codes.

Errors are one sentence on stderr and exit code 1; `--debug` (before or
after the subcommand) adds the traceback. Ctrl-C exits 130; a reader that
stops reading (`setpoint status | head -1`) ends the command quietly (141).
"""

from __future__ import annotations

import os

# gRPC's C core prints some failures on stderr as its own log lines (a refused TLS handshake, at INFO), next to
# the command's one-sentence error and between the daemon's JSON log lines. It reads its verbosity once, when
# grpc is first imported, which the imports below do. A GRPC_VERBOSITY set by the user is kept.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import signal
import sys
import traceback
from collections.abc import Sequence

import structlog

from llm_router import Tier
from plans.yamldoc import YamlError
from policies import PolicyError
from reconciler.cli.common import CliError
from reconciler.cli.config import cmd_check_config
from reconciler.cli.decide import cmd_decide, cmd_replan
from reconciler.cli.issues import cmd_issues_list, cmd_issues_report, cmd_issues_resolve
from reconciler.cli.llm import cmd_llm_eval, cmd_llm_route
from reconciler.cli.plans import cmd_plan, cmd_plans_list, cmd_plans_show
from reconciler.cli.resources import cmd_apply, cmd_delete, cmd_status
from reconciler.cli.run import cmd_run
from reconciler.documents import DocumentError
from reconciler.errors import StartupError
from reconciler.evals import DEFAULT_CASES
from reconciler.logs import configure_logging
from reconciler.settings import SettingsError
from reconciler.store import StoreError, StoreUnavailableError

__all__ = ["CliError", "build_parser", "main"]

_ERRORS = (CliError, SettingsError, PolicyError, DocumentError, YamlError, StartupError, StoreError,
           StoreUnavailableError, ValueError)  # fmt: skip


def _version() -> str:
    from reconciler.daemon import setpoint_version

    return f"setpoint {setpoint_version()}"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", metavar="FILE",
        help="settings file; else $SETPOINT_CONFIG, ./setpoint.yaml, /etc/setpoint/config.yaml, or the defaults",
    )  # fmt: skip
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="setpoint", description="Keep infrastructure at the desired state stored in etcd.",
        epilog="Start with `setpoint run`; `setpoint COMMAND -h` shows each command with an example.",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, parents=[common], help=help, description=help[0].upper() + help[1:] + ".",
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip

    p = command(
        "run",
        "run the daemon (embedded etcd unless etcd.endpoints is set)",
        "setpoint run -c /etc/setpoint/config.yaml",
    )
    p.set_defaults(func=cmd_run)

    p = command("apply", "validate desired resources and write them to etcd", "setpoint apply -f resources.yaml")
    p.add_argument("-f", "--file", required=True, help="YAML or JSON file of resources; - reads standard input")
    p.add_argument("--dry-run", action="store_true", help="validate as the daemon would; write nothing")
    p.set_defaults(func=cmd_apply)

    p = command("delete", "delete a desired resource; setpoint tears down what it made", "setpoint delete file/motd")
    p.add_argument("resource", metavar="KIND/NAME")
    p.add_argument("--keep", action="store_true", help="stop managing it and leave what it made in place")
    p.set_defaults(func=cmd_delete)

    p = command("status", "show each resource's phase, plan and message", "setpoint status file/motd -o json")
    p.add_argument("resource", nargs="?", metavar="KIND/NAME", help="one resource; all when omitted")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_status)

    p = command("plan", "dry run: what setpoint would do, decided by the policies; runs and writes nothing",
                "setpoint plan -f resources.yaml --detailed-exitcode")  # fmt: skip
    p.add_argument("resources", nargs="*", metavar="KIND/NAME", help="only these resources")
    p.add_argument("-f", "--file", help="plan for these desired resources instead of etcd's; - reads standard input")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 0: no changes, 2: changes, 1: error")
    p.add_argument(
        "--observe", action="store_true",
        help="observe the resources here and now (on the daemon's machine) instead of reading actual/",
    )  # fmt: skip
    p.set_defaults(func=cmd_plan)

    p = command("plans", "list plans or show one, with its decision, approval and step journal",
                "setpoint plans list --phase awaiting_approval")  # fmt: skip
    plans = p.add_subparsers(dest="plans_command", required=True, metavar="list|show")
    listing = plans.add_parser("list", parents=[common], help="list plans, oldest first",
                               epilog="example:\n  setpoint plans list file/motd",
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    listing.add_argument("resource", nargs="?", metavar="KIND/NAME")
    listing.add_argument("--phase", help="only plans in this state, e.g. awaiting_approval, succeeded, rejected")
    listing.add_argument("--shadow", action="store_true",
                         help="only plans recorded in shadow mode, each with what then ran for its resource")
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_plans_list)
    show = plans.add_parser("show", parents=[common], help="show one plan",
                            epilog="example:\n  setpoint plans show 019a2f1c2a3b4-1a2b3c4d",
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    show.add_argument("plan_id", metavar="ID")
    show.add_argument("-o", "--output", choices=("text", "json"), default="text")
    show.set_defaults(func=cmd_plans_show)

    for name, help, example in (
        ("approve", "approve a plan awaiting approval; it runs once", "setpoint approve 019a2f1c2a3b4-1a2b3c4d"),
        ("reject", "reject a plan awaiting approval; the resource is Blocked",
         "setpoint reject 019a2f1c2a3b4-1a2b3c4d --reason 'not during the freeze'"),
    ):  # fmt: skip
        p = command(name, help, example)
        p.add_argument("plan_id", metavar="ID")
        p.add_argument("--by", help="who decides; defaults to the OS user")
        p.add_argument("--reason", required=name == "reject", help="why (required to reject)")
        p.add_argument("--hash", help="the plan hash you reviewed (`plans show`); refused if the plan differs")
        p.set_defaults(func=cmd_decide, decision=name)

    p = command(
        "replan", "plan again a resource held Blocked by a rejected or expired plan", "setpoint replan file/motd"
    )
    p.add_argument("resource", metavar="KIND/NAME")
    p.add_argument("--by", help="who asks; defaults to the OS user")
    p.set_defaults(func=cmd_replan)

    p = command("issues", "list, report or resolve the issues reported on resources",
                "setpoint issues report file/motd --summary 'motd shows the wrong banner'")  # fmt: skip
    issues = p.add_subparsers(dest="issues_command", required=True, metavar="list|report|resolve")

    def issues_command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return issues.add_parser(name, parents=[common], help=help, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    listing = issues_command("list", "open issues with what was done about each", "setpoint issues list file/motd")
    listing.add_argument("resource", nargs="?", metavar="KIND/NAME", help="one resource's; all when omitted")
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_issues_list)
    report = issues_command(
        "report", "report an issue on a resource; the daemon heals it once",
        "setpoint issues report file/motd --summary 'wrong banner' --severity critical",
    )  # fmt: skip
    report.add_argument("resource", metavar="KIND/NAME")
    report.add_argument("--summary", required=True, help="what is wrong, in one line")
    report.add_argument("--severity", choices=("info", "warning", "critical"), default="warning")
    report.add_argument("--source", help="who or what reports it; defaults to cli/<OS user>")
    report.add_argument("--id", help="the issue's id; made up when omitted")
    report.set_defaults(func=cmd_issues_report)
    resolve = issues_command(
        "resolve", "delete an issue (it is over)", "setpoint issues resolve file/motd cli-20261122t101500-a1b2c3"
    )
    resolve.add_argument("resource", metavar="KIND/NAME")
    resolve.add_argument("id", metavar="ID")
    resolve.set_defaults(func=cmd_issues_resolve)

    p = command("llm", "language-model planning: the tier a resource routes to, and the evaluation cases",
                "setpoint llm route file/motd")  # fmt: skip
    llm = p.add_subparsers(dest="llm_command", required=True, metavar="route|eval")
    route = llm.add_parser(
        "route", parents=[common], help="the complexity score and tier of a resource's planning now; calls no model",
        epilog="example:\n  setpoint llm route file/motd -o json", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    route.add_argument("resource", metavar="KIND/NAME")
    route.add_argument("-o", "--output", choices=("table", "json"), default="table")
    route.set_defaults(func=cmd_llm_route)
    evals = llm.add_parser(
        "eval", parents=[common], help="run the evaluation cases: recorded answers, or --live the configured models",
        epilog="example:\n  setpoint llm eval --live --tier small",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    evals.add_argument("--live", action="store_true", help="ask the configured models instead of replaying")
    evals.add_argument("--tier", choices=[tier.value for tier in Tier], help="run this tier alone instead of routing")
    evals.add_argument(
        "--cases", metavar="DIR", default=str(DEFAULT_CASES), help="the cases directory (default: %(default)s)"
    )
    evals.add_argument("-o", "--output", choices=("table", "json"), default="table")
    evals.set_defaults(func=cmd_llm_eval)

    p = command("check-config", "validate the settings, the policy file and the secrets they name",
                "setpoint check-config -c /etc/setpoint/config.yaml")  # fmt: skip
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_run:
        return _main(args)  # the daemon sets up its own logging, from its settings
    saved = structlog.get_config()
    configure_logging("warning")  # stdout is the command's output (`plan -o json`): log lines go to stderr
    try:
        return _main(args)
    finally:
        structlog.configure(**saved)


def _main(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return code
    except BrokenPipeError:
        # The reader stopped reading: end quietly, as a process ended by SIGPIPE would, and keep
        # the exit from flushing into the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except _ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"setpoint: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("setpoint: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
